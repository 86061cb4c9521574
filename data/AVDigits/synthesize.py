"""Synthesize the spoken-digit clips that ship with AV-Digits.

A one-off maintainer tool: it calls the espeak-ng speech synthesizer once per
(digit, voice, pitch, speed), resamples to 16 kHz mono, trims the silence around
the word and stores 16-bit FLAC files plus a manifest `clips.csv`. Training never
runs this script; `datasets/avdigits.py` reads the files it leaves behind.

    python data/AVDigits/synthesize.py            # writes beside this script
    python data/AVDigits/synthesize.py --out /tmp/avdigits_clips --pitches 50
"""

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DIGIT_WORDS = ("zero", "one", "two", "three", "four",
               "five", "six", "seven", "eight", "nine")

# espeak-ng accent + voice variant pairs. Accents and variants are mixed so that
# any voice-disjoint split still sees several accents and both voice genders.
DEFAULT_VOICES = (
    "en-gb+m1", "en-gb+f2", "en-us+m3", "en-us+f1", "en-us+m6", "en-gb-scotland+m2",
    "en-gb-scotland+f3", "en-gb-x-rp+m4", "en-gb-x-rp+f4", "en-029+m5", "en-029+f5",
    "en-us-nyc+m7", "en-us-nyc+f2", "en-gb-x-gbclan+m3", "en-gb-x-gbclan+f1",
    "en-gb-x-gbcwmd+m2", "en-gb-x-gbcwmd+f3", "en-gb+m6",
)
DEFAULT_PITCHES = (35, 65)      # espeak -p, 0..99 (50 is the voice's own)
DEFAULT_SPEEDS = (160, 220)     # espeak -s, words per minute (175 is the default)
DEFAULT_SAMPLE_RATE = 16000
DEFAULT_TOP_DB = 40.0           # espeak output is noiseless, so a tight trim is safe
# Half scale still leaves ~15 effective bits, far finer than the noise added at
# materialization, and saves about one FLAC bit per sample (~15% of the assets).
PEAK_LEVEL = 0.5
FLAC_COMPRESSION = 1.0          # soundfile's strongest FLAC setting
MANIFEST_NAME = "clips.csv"
CLIPS_DIRNAME = "clips"
MANIFEST_FIELDS = ("file", "digit", "voice", "pitch", "speed", "num_samples")


def clip_file_name(digit_word: str, voice: str, pitch: int, speed: int) -> str:
    voice_slug = voice.replace("+", "-")
    return f"{digit_word}_{voice_slug}_p{pitch}_s{speed}.flac"


def speak_to_array(espeak: str, text: str, voice: str, pitch: int, speed: int,
                   scratch_wav: Path):
    """Run espeak-ng once and return (mono float32 samples, sample rate)."""
    import soundfile as sf

    command = [espeak, "-v", voice, "-p", str(pitch), "-s", str(speed),
               "-w", str(scratch_wav), text]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or ["no message"]
        raise SystemExit(f"espeak-ng failed for voice '{voice}': {message[0]}")
    samples, sample_rate = sf.read(str(scratch_wav), dtype="float32", always_2d=True)
    return samples.mean(axis=1), sample_rate


def prepare_clip(samples, source_rate: int, target_rate: int, top_db: float):
    """Resample, trim the surrounding silence and peak-normalize one word."""
    import librosa
    import numpy as np

    if source_rate != target_rate:
        samples = librosa.resample(samples, orig_sr=source_rate, target_sr=target_rate)
    trimmed, _ = librosa.effects.trim(samples, top_db=top_db)
    peak = float(np.max(np.abs(trimmed))) if trimmed.size else 0.0
    if peak == 0.0:
        return None
    return (trimmed * (PEAK_LEVEL / peak)).astype(np.float32)


def parse_int_list(text: str, flag: str):
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"{flag} expects comma-separated integers, got '{text}'.")
    if not values:
        raise SystemExit(f"{flag} needs at least one value.")
    return values


def build_arg_parser() -> argparse.ArgumentParser:
    default_out = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(
        description="Synthesize the AV-Digits spoken-digit clips with espeak-ng.")
    parser.add_argument("--out", type=Path, default=default_out,
                        help="folder that receives clips/ and clips.csv "
                             "(default: the folder of this script)")
    parser.add_argument("--voices", default=",".join(DEFAULT_VOICES),
                        help="comma-separated espeak-ng voices (accent+variant)")
    parser.add_argument("--pitches", default=",".join(map(str, DEFAULT_PITCHES)),
                        help="comma-separated espeak-ng pitches (-p, 0..99)")
    parser.add_argument("--speeds", default=",".join(map(str, DEFAULT_SPEEDS)),
                        help="comma-separated espeak-ng speeds (-s, words per minute)")
    parser.add_argument("--sample-rate", type=int, default=DEFAULT_SAMPLE_RATE,
                        help="sample rate of the stored clips in Hz")
    parser.add_argument("--top-db", type=float, default=DEFAULT_TOP_DB,
                        help="silence threshold below the peak for trimming, in dB")
    parser.add_argument("--espeak", default="espeak-ng",
                        help="espeak-ng executable name or path")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    import soundfile as sf
    from tqdm import tqdm

    espeak = shutil.which(args.espeak)
    if espeak is None:
        raise SystemExit(f"--espeak: cannot find the executable '{args.espeak}' "
                         "(install the Debian package espeak-ng).")
    voices = tuple(v.strip() for v in args.voices.split(",") if v.strip())
    if not voices:
        raise SystemExit("--voices needs at least one voice.")
    pitches = parse_int_list(args.pitches, "--pitches")
    speeds = parse_int_list(args.speeds, "--speeds")

    clips_dir = args.out / CLIPS_DIRNAME
    if clips_dir.exists():
        # Stale clips from an earlier voice list would otherwise linger unlisted.
        shutil.rmtree(clips_dir)
    clips_dir.mkdir(parents=True)

    jobs = [(w, v, p, s) for w in DIGIT_WORDS for v in voices
            for p in pitches for s in speeds]
    rows, silent = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch_wav = Path(scratch) / "word.wav"
        for word, voice, pitch, speed in tqdm(jobs, desc="synthesizing", unit="clip"):
            samples, rate = speak_to_array(espeak, word, voice, pitch, speed, scratch_wav)
            clip = prepare_clip(samples, rate, args.sample_rate, args.top_db)
            if clip is None:
                silent.append(f"{word}/{voice}/p{pitch}/s{speed}")
                continue
            name = clip_file_name(word, voice, pitch, speed)
            sf.write(str(clips_dir / name), clip, args.sample_rate,
                     format="FLAC", subtype="PCM_16",
                     compression_level=FLAC_COMPRESSION)
            rows.append({"file": f"{CLIPS_DIRNAME}/{name}", "digit": word,
                         "voice": voice, "pitch": pitch, "speed": speed,
                         "num_samples": len(clip)})

    with open(args.out / MANIFEST_NAME, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    longest = max(row["num_samples"] for row in rows) / args.sample_rate
    print(f"wrote {len(rows)} clips to {clips_dir} (longest {longest:.2f} s); "
          f"skipped {len(silent)} silent outputs")
    for item in silent:
        print(f"  silent: {item}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
