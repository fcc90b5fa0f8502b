"""Download the full benchmark files into data/ (or --data_dir).

    python download_data.py                  # every task
    python download_data.py --data_name esc  # one task

Files come from the public releases that the PPDPP and DialogXpert code use (each task's
`sources` in tasks.py). --base_url replaces the host part for a mirror: a file is then
fetched from <base_url>/<relative path>. Each downloaded file is checked with the project's own reader
before it replaces anything, so a broken download never overwrites good data.
"""

import argparse
import os
import sys
import tempfile
import urllib.error
import urllib.request

from tasks import TASKS, DataError, read_file



def files_for(task_name):
    return sorted(set(TASKS[task_name].files.values()))


def fetch(url, timeout):
    request = urllib.request.Request(url, headers={"User-Agent": "dialogxpert-download"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def download(task_names, data_dir, base_url=None, timeout=60):
    """Fetch every file of the tasks; returns (downloaded paths, {path: error}). A file
    replaces the one in data_dir only when the task's reader accepts it and it has at
    least one case; otherwise the old file stays and the next file is fetched."""
    done, failed = [], {}
    for task_name in task_names:
        for relative in files_for(task_name):
            url = (f"{base_url.rstrip('/')}/{relative}" if base_url
                   else TASKS[task_name].sources[relative])
            target = os.path.join(data_dir, relative)
            try:
                content = fetch(url, timeout)
            except (urllib.error.URLError, TimeoutError, OSError) as error:
                failed[relative] = f"{url}: {error}"
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as staging:
                staged = os.path.join(staging, os.path.basename(relative))
                with open(staged, "wb") as f:
                    f.write(content)
                try:  # validate with the project's reader before replacing anything
                    cases = read_file(staged, task_name)
                    if not cases:
                        raise DataError("no cases")
                except DataError as error:
                    failed[relative] = f"{url}: downloaded but unusable ({error})"
                    continue
                existed = os.path.exists(target)
                os.replace(staged, target)
            done.append(target)
            print(f"{relative}: {'replaced' if existed else 'new'}, {len(cases):,} cases "
                  f"({len(content):,} bytes) from {url}")
    return done, failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_name", default="all",
                        help=f"one of {sorted(TASKS)} or all (default: all)")
    parser.add_argument("--data_dir", default="data", help="target folder (default: data)")
    parser.add_argument("--base_url", default=None, help="mirror that serves the same paths")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per file")
    args = parser.parse_args(argv)
    if args.data_name != "all" and args.data_name not in TASKS:
        parser.error(f"Unknown --data_name '{args.data_name}'. Expected one of "
                     f"{sorted(TASKS) + ['all']}")
    names = sorted(TASKS) if args.data_name == "all" else [args.data_name]
    _, failed = download(names, args.data_dir, args.base_url, args.timeout)
    for relative, reason in failed.items():
        kept = "the existing file is kept" if os.path.exists(
            os.path.join(args.data_dir, relative)) else "no file written"
        print(f"error: {relative} failed: {reason}; {kept}. Try again, or use --base_url "
              f"with a mirror.", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
