import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# examples/ (model fixtures) and format_spec/golden are plain folders, not installed packages.
sys.path.insert(0, str(ROOT))
