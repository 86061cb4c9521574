"""Kinetics-Sounds: extract every video's audio
as <root>/audio/<clip>.wav (16 kHz mono PCM16).

Usage:
    python data/KineticSound/mp4_to_wav.py --video-dir ks/videos --root ks
(--help lists every flag; rerunning skips finished clips.)
"""
import sys
from pathlib import Path


def main(argv=None):
    # Run as a plain file, so the repository root is put on the import path by hand.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datasets.preprocess import main as run_preprocessing
    run_preprocessing("KineticSound", "audio", argv)


if __name__ == "__main__":
    main()
