# make deb: the Debian package, dist/sandgate_<version>_<arch>.deb (see scripts/deb/build and
# "The Debian package" in docs/operations.md).

.PHONY: deb
deb:
	./scripts/deb/build
