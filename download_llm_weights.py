"""Download model weights from the Hugging Face hub into weights/.

    python download_llm_weights.py                                   # Qwen2.5-1.5B-Instruct
    python download_llm_weights.py --repo_id Qwen/Qwen2.5-7B-Instruct --local_dir weights/Qwen2.5-7B-Instruct
    python download_llm_weights.py --repo_id google-bert/bert-base-uncased --local_dir weights/bert-base-uncased

train_model.py's `--llm auto` and `--encoder auto` use weights/Qwen2.5-1.5B-Instruct and
weights/bert-base-uncased when they exist. A token for gated models is read from the
environment (HF_TOKEN), never from the command line, and never printed.
"""

import os
import sys

from errors import ArgumentParser, one_line_errors

# the hub organisation of a weights folder, by the start of its name: the models that
# README.md and docs/ name (the folder is the hub name, as main() names it by default)
HUB_OWNERS = {"Qwen": "Qwen", "SmolLM": "HuggingFaceTB", "bert-": "google-bert",
              "roberta-": "FacebookAI"}


def hub_id(folder):
    """The hub id of a weights folder named as main() names it (weights/<model name>), for
    the models the docs name; None for others."""
    name = os.path.basename(os.path.normpath(folder))
    owner = next((owner for start, owner in HUB_OWNERS.items() if name.startswith(start)),
                 None)
    return f"{owner}/{name}" if owner else None


def download_command(folder):
    """The command that downloads a weights folder (a placeholder for the hub id of a
    model the docs do not name)."""
    repo = hub_id(folder) or f"<the hub id of {os.path.basename(os.path.normpath(folder))}>"
    return f"python download_llm_weights.py --repo_id {repo} --local_dir {folder}"


def download(repo_id, local_dir, revision=None, endpoint=None, allow_patterns=None):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=repo_id, revision=revision, local_dir=local_dir,
                             token=os.environ.get("HF_TOKEN") or None, endpoint=endpoint,
                             allow_patterns=allow_patterns)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", default="Qwen/Qwen2.5-1.5B-Instruct", help="hub model id")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--local_dir", default=None,
                        help="target folder (default: weights/<model name>)")
    parser.add_argument("--endpoint", default=None,
                        help="hub address, for a mirror (default: HF_ENDPOINT or the public hub)")
    parser.add_argument("--allow_patterns", nargs="*", default=None,
                        help="only files matching these globs (default: all)")
    args = parser.parse_args(argv)
    local_dir = args.local_dir or os.path.join("weights", args.repo_id.split("/")[-1])
    try:
        path = download(args.repo_id, local_dir, args.revision, args.endpoint,
                        args.allow_patterns)
    except Exception as error:  # huggingface_hub raises many kinds; all end the same way
        print(f"error: could not download {args.repo_id} to {local_dir} "
              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
              "Check the name, the network or HF_TOKEN, or use --endpoint with a mirror",
              file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"warning: {path} has no config.json; is '{args.repo_id}' a transformers model?",
              file=sys.stderr)
    print(f"Downloaded {args.repo_id} to {path}. Use it with --llm {path} (or --encoder).")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
