"""Build the embedded CIFAR-10 sample from the full CIFAR-10 JPEG archive.

The sample ships inside the package so that `vgg-ablation train` and the `sample` study work
offline on a fresh clone. It was built with:

    python vgg_ablation/sample_data/build_sample.py ../shared/data/cifar10-jpeg.zip

from `cifar10-jpeg.zip` (all 60,000 CIFAR-10 images as JPEGs in ImageFolder layout, see
PROVENANCE.md). The selection is a seeded random draw per class, so rebuilding gives the same
files byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import zipfile
from pathlib import Path

SAMPLE_ROOT = Path(__file__).resolve().parent / "cifar10"
SPLITS = {"train": 500, "test": 100}  # images per class, drawn from the archive's train / test
SELECTION_SEED = 1409_1556  # the paper's arXiv number


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="cifar10-jpeg.zip")
    parser.add_argument("--out", type=Path, default=SAMPLE_ROOT)
    args = parser.parse_args()
    if not args.archive.is_file():
        print(f"error: no such archive: {args.archive}", file=sys.stderr)
        return 2

    rng = random.Random(SELECTION_SEED)
    with zipfile.ZipFile(args.archive) as archive:
        names = [n for n in archive.namelist() if n.endswith(".jpg")]
        by_split_class: dict[tuple[str, str], list[str]] = {}
        for name in names:
            _, split, cls, _ = name.split("/")
            by_split_class.setdefault((split, cls), []).append(name)
        tmp = args.out.with_name(args.out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        digest = hashlib.sha256()
        for (split, cls), members in sorted(by_split_class.items()):
            chosen = sorted(rng.sample(sorted(members), SPLITS[split]))
            target = tmp / split / cls
            target.mkdir(parents=True)
            for member in chosen:
                data = archive.read(member)
                digest.update(member.encode() + data)
                (target / Path(member).name).write_bytes(data)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"wrote {args.out} (sha256 of names+bytes: {digest.hexdigest()[:16]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
