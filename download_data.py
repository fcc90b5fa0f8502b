"""Download the full benchmark files into data/ (or --data_dir).

    python download_data.py                  # every task
    python download_data.py --data_name esc  # one task

Where each file comes from is its task's `sources` in tasks.py ({path: URL}): esc, cima
and cb from PPDPP's repository (dengyang17/PPDPP, data/), p4g and ExTES from the
DialogXpert release (declare-lab/dialogxpert, data/P4G/api_annotated/ and
data/ExTES/ExTES.json, the files its misc.load_p4g and load_extes read). A task whose
`sources` lack a file of its `files` is refused with one `error:` line before anything is
fetched. `--extes_source authors` takes ExTES from its authors' repository instead
(pandazzh2020/ExTES). `--base_url` fetches every file from a mirror of the data folder,
<base_url>/<relative path>; `--github` replaces the host of the GitHub sources
(https://raw.githubusercontent.com) with a mirror of that host. Each downloaded file is
checked with the project's own reader before it replaces anything, so a broken download
never overwrites good data.
"""

import os
import sys
import tempfile
import urllib.error
import urllib.request

from errors import ArgumentParser, one_line_errors
from tasks import EXTES_AUTHORS, GITHUB, TASKS, DataError, read_file

# --extes_source: where ExTES/ExTES.json comes from
EXTES_SOURCES = {"release": TASKS["extes"].sources["ExTES/ExTES.json"], "authors": EXTES_AUTHORS}


def files_for(task_name):
    return sorted(set(TASKS[task_name].files.values()))


def files_without_source(task_names):
    """{task: [its data files that its `sources` in tasks.py give no URL]}."""
    missing = {name: [path for path in files_for(name) if path not in TASKS[name].sources]
               for name in task_names}
    return {name: paths for name, paths in missing.items() if paths}


def fetch(url, timeout):
    request = urllib.request.Request(url, headers={"User-Agent": "dialogxpert-download"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def source_url(task_name, relative, base_url=None, github=None, extes_source="release"):
    """The URL of one data file: its task's source (ExTES: by extes_source), its GitHub
    host replaced by `github`, or <base_url>/<relative> from a mirror of the data folder."""
    if base_url:
        return f"{base_url.rstrip('/')}/{relative}"
    url = (EXTES_SOURCES[extes_source] if relative == "ExTES/ExTES.json"
           else TASKS[task_name].sources[relative])
    if github and url.startswith(GITHUB + "/"):
        url = github.rstrip("/") + url[len(GITHUB):]
    return url


def download(task_names, data_dir, base_url=None, timeout=60, github=None,
             extes_source="release"):
    """Fetch every file of the tasks; returns (downloaded paths, {path: error}). A file
    replaces the one in data_dir only when the task's reader accepts it and it has at
    least one case; otherwise the old file stays and the next file is fetched."""
    done, failed = [], {}
    for task_name in task_names:
        for relative in files_for(task_name):
            url = source_url(task_name, relative, base_url, github, extes_source)
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
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_name", default="all",
                        help=f"one of {sorted(TASKS)} or all (default: all)")
    parser.add_argument("--data_dir", default="data", help="target folder (default: data)")
    parser.add_argument("--base_url", default=None,
                        help="mirror of the data folder: every file from <base_url>/<path>")
    parser.add_argument("--github", default=None,
                        help=f"mirror of {GITHUB}: the GitHub sources' host is replaced by it")
    parser.add_argument("--extes_source", default="release",
                        help="ExTES from the DialogXpert release's data/ExTES/ExTES.json "
                             "(release, what the original trained on) or its authors' "
                             "repository (authors; where that holds only a zip, unzip "
                             "ExTES.json into <data_dir>/ExTES/ by hand)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per file")
    args = parser.parse_args(argv)
    if args.data_name != "all" and args.data_name not in TASKS:
        parser.error(f"Unknown --data_name '{args.data_name}'. Expected one of "
                     f"{sorted(TASKS) + ['all']}")
    if args.timeout <= 0:
        parser.error(f"--timeout {args.timeout} is out of range: pass seconds > 0")
    if args.extes_source not in EXTES_SOURCES:
        print(f"error: unknown --extes_source '{args.extes_source}'. Pass one of "
              f"{sorted(EXTES_SOURCES)}", file=sys.stderr)
        return 2
    names = sorted(TASKS) if args.data_name == "all" else [args.data_name]
    missing = {} if args.base_url else files_without_source(names)
    if missing:
        listed = "; ".join(f"task '{name}': {', '.join(paths)}" for name, paths in missing.items())
        one_task = " pass --data_name with a task that has them," if len(names) > 1 else ""
        print(f"error: no download source in tasks.py for {listed}. Add each file's URL to its "
              f"task's `sources` in tasks.py,{one_task} pass --base_url with a mirror of the "
              f"data folder, or write the files into {args.data_dir} yourself", file=sys.stderr)
        return 2
    _, failed = download(names, args.data_dir, args.base_url, args.timeout, args.github,
                         args.extes_source)
    for relative, reason in failed.items():
        kept = "the existing file is kept" if os.path.exists(
            os.path.join(args.data_dir, relative)) else "no file written"
        print(f"error: {relative} failed: {reason}; {kept}. Try again, or use --base_url "
              f"with a mirror.", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
