"""``python -m monai_wsss.benchmark {speed,table,ablation,authors,paths} [options]``."""

import importlib
import sys

COMMANDS = {
    "speed": "monai_wsss.benchmark.speed",
    "table": "monai_wsss.benchmark.table",
    "ablation": "monai_wsss.benchmark.ablation",
    "authors": "monai_wsss.benchmark.authors",
    "paths": "monai_wsss.benchmark.paths",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m monai_wsss.benchmark {{{','.join(COMMANDS)}}} [options]  (got {argv[:1]})")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
