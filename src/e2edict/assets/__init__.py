"""Files shipped with the package: the embedded tiny model and the public-domain corpus."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_MODEL_DIR = ASSETS_DIR / "tiny"
CORPUS_DIR = ASSETS_DIR / "corpus"
