"""vgg-ablation: does the VGG paper's ablation hold on your data and your budget?"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vgg-ablation")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
