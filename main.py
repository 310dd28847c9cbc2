"""PILOT-compatible entry point: ``python main.py --config exps/simplecil.json``."""
import sys

from pilot.cli import main

if __name__ == "__main__":
    sys.exit(main())
