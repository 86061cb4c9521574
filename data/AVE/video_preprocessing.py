"""AVE: keep --fps frames per second of every video
as JPEGs in <root>/Image-NN-FPS/<clip>/ (Image-01-FPS at the default --fps 1).

Usage:
    python data/AVE/video_preprocessing.py --root AVE_Dataset      (videos in AVE_Dataset/AVE/)
(--help lists every flag; rerunning skips finished clips.)
"""
import sys
from pathlib import Path


def main(argv=None):
    # Run as a plain file, so the repository root is put on the import path by hand.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datasets.preprocess import main as run_preprocessing
    run_preprocessing("AVE", "frames", argv)


if __name__ == "__main__":
    main()
