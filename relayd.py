#!/usr/bin/env python3
"""Entry point: ``python relayd.py --config FILE`` from a checkout.

Checked before anything is imported, so a Python without relayd's
requirements gets a message saying what to run instead of a traceback.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements_missing():
    """A message for the operator when this Python cannot run relayd, else None."""
    if sys.version_info < (3, 11):
        found = "Python %d.%d" % sys.version_info[:2]
    else:
        try:
            import websockets  # noqa: F401
            return None
        except ImportError:
            found = "Python %d.%d without the websockets package" % sys.version_info[:2]
    venv = os.path.join(HERE, ".venv")
    venv_python = os.path.join(venv, "bin", "python")
    args = " ".join(sys.argv)
    lines = ["relayd needs Python 3.11 or newer with the websockets package; %s is %s." % (sys.executable, found)]
    if os.path.exists(venv_python) and os.path.abspath(sys.executable) != venv_python:
        lines += ["Use the project's virtual environment:", "  %s %s" % (venv_python, args), "or install"]
    else:
        lines.append("Install")
    lines[-1] += " relayd into a virtual environment made with Python 3.11 or newer:"
    lines += ["  python3 -m venv %s && %s -m pip install -e %s" % (venv, venv_python, HERE),
              "then run:", "  %s %s" % (venv_python, args)]
    return "\n".join(lines)

if __name__ == "__main__":
    problem = _requirements_missing()
    if problem:
        sys.stderr.write(problem + "\n")
        sys.exit(2)
    from relayd.cli import main
    sys.exit(main())
