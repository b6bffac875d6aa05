"""``fedseg check-data``'s file-name checks: which files make a case, and which are strays.

Apart from the image checks (``validate.py``) because they need no image reader: names, channel
suffixes, endings and case-id collisions, each problem one line naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from fedseg.data.dataset_json import DatasetJson

NIFTI_ENDINGS = (".nii.gz", ".nii")


def _other_ending(name: str, ending: str) -> str | None:
    """The NIfTI ending of ``name`` if it is one other than the dataset's ``ending``."""
    for other in NIFTI_ENDINGS:
        if other != ending and name.endswith(other) and not name.endswith(ending):
            return other
    return None


def _split_channel(stem: str) -> tuple[str, int] | None:
    """``"case_0001" -> ("case", 1)``; None without a ``_XXXX`` channel suffix."""
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5], int(stem[-4:])
    return None


def check_files(
    root: Path, ds: DatasetJson, split: str, problems: list[str]
) -> list[str]:
    """Check file names of ``images{split}``/``labels{split}``; return the sorted case ids."""
    ending = ds.file_ending
    img_dir, lab_dir = root / f"images{split}", root / f"labels{split}"
    ids: set[str] = set()
    channels: dict[str, set[int]] = {}
    stray: list[tuple[Path, str, str | None]] = []  # (file, other ending, case id)
    broken: set[str] = set()  # case ids whose image is a dangling or looping symlink
    for p in sorted(img_dir.iterdir()) if img_dir.is_dir() else []:
        if not p.name.startswith(".") and p.is_symlink() and not p.exists():
            problems.append(f"{p}: broken or looping symbolic link; point it at a real file")
            parsed = _split_channel(p.name[: -len(ending)]) if p.name.endswith(ending) else None
            broken.add(parsed[0] if parsed else p.name[: -len(ending)])
            continue
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.name.endswith(ending):
            parsed = _split_channel(p.name[: -len(ending)])
            if parsed is None:
                stem = p.name[: -len(ending)]
                problems.append(
                    f"{p}: no channel suffix; rename it to {stem}_0000{ending} "
                    "(nnU-Net names image files CASE_XXXX with XXXX the channel index)"
                )
                continue
            cid, chan = parsed
            ids.add(cid)
            channels.setdefault(cid, set()).add(chan)
            if chan >= ds.num_channels:
                problems.append(
                    f"{p}: channel {chan:04d}, but dataset.json declares {ds.num_channels} "
                    f"channel(s); remove the file or add the channel to channel_names"
                )
        elif (other := _other_ending(p.name, ending)) is not None:
            parsed = _split_channel(p.name[: -len(other)])
            stray.append((p, other, parsed[0] if parsed else None))
    if stray and not ids:  # the whole folder uses another ending: one line, not one per file
        other = stray[0][1]
        problems.append(
            f"{img_dir}: holds {len(stray)} {other} file(s) but dataset.json file_ending is "
            f"{ending}; set file_ending to \"{other}\" (or convert the files)"
        )
        return []
    for p, other, cid in stray:
        if cid is not None and cid in ids:
            problems.append(
                f"{p}: duplicate of case '{cid}' (also stored with ending {ending}); "
                "remove one of the two copies"
            )
        else:
            problems.append(
                f"{p}: file ending {other} differs from dataset.json file_ending {ending}, "
                f"so the file is ignored; convert/rename it to {ending} or fix file_ending"
            )
    _check_case_collisions(img_dir, ids, problems)

    if lab_dir.is_dir() and ids:  # without images, the folder-level line says it all
        label_ids: set[str] = set()
        for p in sorted(lab_dir.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if p.name.endswith(ending):
                cid = p.name[: -len(ending)]
                label_ids.add(cid)
                if cid not in ids and cid not in broken:  # a broken image is named above
                    parsed = _split_channel(cid)
                    hint = (
                        f"rename it to {parsed[0]}{ending} (labels have no channel suffix)"
                        if parsed and parsed[0] in ids
                        else f"add images{split}/{cid}_0000{ending} or remove the label"
                    )
                    problems.append(f"{p}: label without a matching image; {hint}")
            elif (other := _other_ending(p.name, ending)) is not None:
                cid = p.name[: -len(other)]
                if (lab_dir / f"{cid}{ending}").is_file():
                    problems.append(
                        f"{p}: duplicate label of case '{cid}' (also stored with ending "
                        f"{ending}); remove one of the two copies"
                    )
                else:
                    problems.append(
                        f"{p}: file ending {other} differs from dataset.json file_ending "
                        f"{ending}, so the label is ignored; convert/rename it to {ending}"
                    )
        _check_case_collisions(lab_dir, label_ids, problems)
    return sorted(ids)


def _check_case_collisions(folder: Path, ids: set[str], problems: list[str]) -> None:
    """Case ids that differ only in letter case collide on Windows/macOS file systems."""
    by_lower: dict[str, list[str]] = {}
    for cid in ids:
        by_lower.setdefault(cid.lower(), []).append(cid)
    for group in by_lower.values():
        if len(group) > 1:
            names = " and ".join(f"'{c}'" for c in sorted(group))
            problems.append(
                f"{folder}: case ids {names} differ only in letter case (duplicates on "
                "Windows/macOS); rename one of them"
            )


