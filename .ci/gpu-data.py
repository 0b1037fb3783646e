"""`make gpu-data`: the GPU study's data, small enough to travel to a lent GPU machine.

A lent machine takes 64 MiB of working tree in all and reaches no network: all of CIFAR-10 as
JPEGs is 60 MiB, so this keeps 3,500 training images per class (the first by name) and every test
image, about 50 MiB, as .gpu-data/cifar10-gpu.zip (stored: JPEGs do not compress). Usage:
    python .ci/gpu-data.py [SOURCE_ZIP]   (default: ../shared/data/cifar10-jpeg.zip)
"""

import sys
import zipfile
from collections import defaultdict
from pathlib import Path

PER_CLASS = 3500
source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-jpeg.zip")
target = Path(".gpu-data/cifar10-gpu.zip")
if not source.is_file():
    sys.exit(f"error: no CIFAR-10 JPEG zip at {source} (give its path)")
target.parent.mkdir(exist_ok=True)
kept: dict[str, int] = defaultdict(int)
with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
    for name in sorted(n for n in src.namelist() if n.endswith(".jpg")):
        parts = Path(name).parts  # cifar10/<split>/<class>/<file>
        split, cls = parts[-3], parts[-2]
        if split == "train" and kept[cls] >= PER_CLASS:
            continue
        kept[cls] += split == "train"
        dst.writestr(f"cifar10/{split}/{cls}/{parts[-1]}", src.read(name))
size = target.stat().st_size / 2**20
print(
    f"{target}: {sum(kept.values()):,} train images ({PER_CLASS:,} per class) and every test image, {size:.1f} MiB"
)
