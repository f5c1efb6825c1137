"""A bounded fork bomb: fork until the kernel refuses, every child just sleeping.

Bounded three ways: at most MAX_FORKS forks, children exit by themselves after
CHILD_SECONDS, and they all die with the sandbox anyway (init kills everything when the
command ends). Prints {"hostname", "forked", "errno"}; then (with --wait) keeps every
child alive until a line arrives on stdin, so the host can look meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time

MAX_FORKS = 5000
CHILD_SECONDS = 60


def main() -> None:
    forked, failed = 0, None
    for _ in range(MAX_FORKS):
        try:
            pid = os.fork()
        except OSError as exc:
            failed = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            break
        if pid == 0:
            time.sleep(CHILD_SECONDS)
            os._exit(0)
        forked += 1
    report = {"hostname": socket.gethostname(), "forked": forked, "errno": failed}
    print(json.dumps(report), flush=True)
    if "--wait" in sys.argv:
        sys.stdin.readline()


if __name__ == "__main__":
    main()
