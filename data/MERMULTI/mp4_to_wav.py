"""MER-MULTI: extract every raw video's audio
as <root>/audio/<sample>.wav (16 kHz mono PCM16), the folder MER2023's audio feature
extractors read (docs/olm_trans.md, "From raw videos to features").

Usage:
    python data/MERMULTI/mp4_to_wav.py --video-dir MER2023/video --root MER2023
(--help lists every flag; rerunning skips finished samples.)
"""
import sys
from pathlib import Path


def main(argv=None):
    # Run as a plain file, so the repository root is put on the import path by hand.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datasets.preprocess import main as run_preprocessing
    run_preprocessing("MERMULTI", "audio", argv)


if __name__ == "__main__":
    main()
