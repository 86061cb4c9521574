"""AVE: extract every video's audio
as <root>/audio/<clip>.wav (16 kHz mono PCM16).

Usage:
    python data/AVE/mp4_to_wav.py --root AVE_Dataset      (videos in AVE_Dataset/AVE/)
(--help lists every flag; rerunning skips finished clips.)
"""
import sys
from pathlib import Path


def main(argv=None):
    # Run as a plain file, so the repository root is put on the import path by hand.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datasets.preprocess import main as run_preprocessing
    run_preprocessing("AVE", "audio", argv)


if __name__ == "__main__":
    main()
