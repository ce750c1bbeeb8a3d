"""`python -m kernels OP [options]`: the lesson of one op (kernels/lesson.py): every version of
kernels/OP.cu checked against kernels/reference.py and timed.  `python -m kernels.OP [options]`
is the same command (each launcher hands its name on to this file).  With no OP: the ops.
"""

import sys

from . import cases, lesson


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in cases.CASES:
        out = sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr
        if argv and out is sys.stderr:
            print(f"python -m kernels: no op {argv[0]!r}", file=out)
        print("usage: python -m kernels OP [--list | --version N | --shape ... | --source FILE.cu | --emulator]\n"
              "       (or python -m kernels.OP ...); OP is one of:", file=out)
        for name, case in cases.CASES.items():
            print(f"  {name:<14} {case.title}", file=out)
        return 0 if out is sys.stdout else 2
    return lesson.main(argv[0], argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
