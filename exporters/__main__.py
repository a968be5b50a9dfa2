"""``python -m exporters export ...``: the same as ``python -m fasterrcnn export ...``.

The command line lives in the deployment package (fasterrcnn/__main__.py); this alias stays for
scripts written against the old spelling.  It accepts only ``export``.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from fasterrcnn.__main__ import main as fasterrcnn_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["export"]:
        print("usage: python -m exporters export [options]  (the other commands: python -m fasterrcnn --help)",
              file=sys.stderr)
        return 2
    return fasterrcnn_main(argv)


if __name__ == "__main__":
    sys.exit(main())
