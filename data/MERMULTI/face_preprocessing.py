"""MER-MULTI: save the largest face of every frame of every raw video
as <root>/openface_face/<sample>/<frame>.jpg (112x112), the folder MER2023's visual feature
extractors read (docs/olm_trans.md, "From raw videos to features").

Usage:
    python data/MERMULTI/face_preprocessing.py --video-dir MER2023/video --root MER2023
(--help lists every flag; rerunning skips finished samples.)
"""
import sys
from pathlib import Path


def main(argv=None):
    # Run as a plain file, so the repository root is put on the import path by hand.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datasets.preprocess import main as run_preprocessing
    run_preprocessing("MERMULTI", "faces", argv)


if __name__ == "__main__":
    main()
