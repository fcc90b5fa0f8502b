"""Real runs of train_model.py on esc with scripted LLM clients and a tiny random encoder
(conftest.make_runs, which describes the scripted world): a trained run and a
random-policy baseline on the same test cases and seed. view.py is tested on these, and
benchmarked at scale:

    python tests/scripted_runs.py /tmp/scripted --cases 10000    # then bench.py --view RUN
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from conftest import make_runs  # noqa: E402 (after the paths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder for the data, the encoder and the runs")
    parser.add_argument("--cases", type=int, default=12, help="test cases")
    parser.add_argument("--baseline", default="random",
                        help="the baseline policy's test run ('' for none)")
    args = parser.parse_args()
    for folder in make_runs(args.root, args.cases, baseline=args.baseline or None):
        print(f"run: {folder}")


if __name__ == "__main__":
    main()
