"""The runner: Sandbox lifecycle, process launch, CLI, state and host checks.

It composes netns/, nft/ and gateway/; none of those import it.
"""
