"""The output folder of inference_visualize.py: it writes only files it owns, and never over an input.

A folder is ours when it is new, empty, or holds our marker (MARKER): a list of the files we wrote there in
earlier runs. We replace only those. A file of the same name that we did not write (a user's photo, a
spreadsheet), and any file given to us as an input, are never written over, renamed or deleted: the run
stops before the model loads, naming the file. Paths are compared after `..`, `./`, trailing slashes and
symbolic links are resolved.

    folder = OutputFolder.claim("outputs", ["a.jpg", "captions.csv", ...], inputs=paths)
    folder.path("a.jpg")
"""
import json
import os

from utils import UserError, atomic_write_text, shown_name

MARKER = ".captions-output.json"


class OutputFolder:
    def __init__(self, folder: str, files: set):
        self.folder, self.files = folder, files

    @classmethod
    def claim(cls, folder: str, names: list[str], inputs: list[str]) -> "OutputFolder":
        """Check that every name in `names` may be written in folder, then make the folder and record them in its
        marker; UserError (one line, nothing written) otherwise."""
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--out {shown_name(folder)} is a file; give a folder for the captioned images and the "
                            f"gallery")
        ours = _written_before(folder)
        if ours is None:
            raise UserError(f"--out {shown_name(folder)} holds files that inference_visualize.py did not write; it "
                            f"never writes over them: give a new or empty folder, e.g. --out outputs")
        given = {os.path.realpath(p) for p in inputs}
        for name in names:
            target = os.path.join(folder, name)
            if os.path.realpath(target) in given:
                raise UserError(f"--out {shown_name(folder)}: writing {shown_name(name)} there would replace an "
                                f"input image; give another folder for the results")
            if os.path.lexists(target) and name not in ours:
                raise UserError(f"--out {shown_name(folder)} holds {shown_name(name)}, which inference_visualize.py "
                                f"did not write; it never writes over it: give a new or empty folder")
        os.makedirs(folder, exist_ok=True)
        claimed = cls(folder, ours | set(names))
        atomic_write_text(os.path.join(folder, MARKER), json.dumps({"written_by": "inference_visualize.py",
                                                                     "files": sorted(claimed.files)}, indent=0))
        return claimed

    def path(self, name: str) -> str:
        if name not in self.files:
            raise ValueError(f"{name} was not claimed in {self.folder}")
        return os.path.join(self.folder, name)


def _written_before(folder: str) -> set | None:
    """The names our marker lists (an empty set for a new or empty folder), or None when the folder holds
    files without a marker of ours."""
    if not os.path.isdir(folder):
        return set()
    marker = os.path.join(folder, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                files = json.load(f)["files"]
            if isinstance(files, list) and all(isinstance(n, str) for n in files):
                return set(files)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None
    return set() if not os.listdir(folder) else None
