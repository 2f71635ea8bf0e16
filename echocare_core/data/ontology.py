"""Anatomy ontology: region -> organ -> structure, as used by the hierarchical classifier.

An ontology file is a YAML mapping `Region: {Organ: [Structure, ...]}`. A label is a path such as
`Thorax/Heart/Apical four-chamber` and may stop at any level (`Thorax`, `Thorax/Heart`).
Nodes are indexed regions first, then organs, then structures, so the classifier's outputs are
`N_region + N_organ + N_structure` logits in that order.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["Ontology", "load_ontology", "DEFAULT_ONTOLOGY"]

DEFAULT_ONTOLOGY = "default"
LEVELS = ("region", "organ", "structure")


@dataclass(frozen=True)
class Ontology:
    """A three-level anatomy tree.

    Attributes:
        paths: every node as a tuple of names, regions first, then organs, then structures.
        parents: index of each node's parent, -1 for regions.
    """

    paths: tuple[tuple[str, ...], ...]
    parents: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.paths)

    def names(self) -> list[str]:
        return ["/".join(p) for p in self.paths]

    def to_tree(self) -> dict[str, Any]:
        """The nested mapping this ontology was read from (stored in checkpoints)."""
        tree: dict[str, Any] = {}
        for p in self.paths:
            if len(p) == 1:
                tree[p[0]] = {}
            elif len(p) == 2:
                tree[p[0]][p[1]] = []
            else:
                tree[p[0]][p[1]].append(p[2])
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any], source: str = "<ontology>") -> Ontology:
        """Build from `{Region: {Organ: [Structure, ...]}}`.

        Raises:
            ValueError: when the tree is not of that shape or a name repeats under one parent.
        """
        if not isinstance(tree, dict) or not tree:
            raise ValueError(f"{source}: expected a mapping Region: {{Organ: [Structure, ...]}}")
        levels: list[list[tuple[str, ...]]] = [[], [], []]
        for region, organs in tree.items():
            levels[0].append((str(region),))
            if organs is None:
                continue
            if not isinstance(organs, dict):
                raise ValueError(f"{source}: region '{region}' must map organ names to lists of structures")
            for organ, structures in organs.items():
                levels[1].append((str(region), str(organ)))
                if structures is None:
                    continue
                if not isinstance(structures, list):
                    raise ValueError(f"{source}: '{region}/{organ}' must be a list of structure names")
                for s in structures:
                    levels[2].append((str(region), str(organ), str(s)))
        paths = [p for level in levels for p in level]
        lowered = ["/".join(p).lower() for p in paths]
        dup = {x for x in lowered if lowered.count(x) > 1}
        if dup:
            raise ValueError(f"{source}: names repeat under one parent: {sorted(dup)}")
        index = {p: i for i, p in enumerate(paths)}
        parents = tuple(index[p[:-1]] if len(p) > 1 else -1 for p in paths)
        return cls(paths=tuple(paths), parents=parents)

    def lookup(self, label: str) -> int:
        """Index of the node a label names (case-insensitive, '/' separated); -1 for an empty label.

        Raises:
            ValueError: the path is not in the ontology; the message shows the closest known path.
        """
        label = label.strip().strip("/")
        if not label:
            return -1
        key = "/".join(part.strip() for part in label.split("/")).lower()
        table = self._lowered_index()
        if key in table:
            return table[key]
        close = difflib.get_close_matches(key, list(table), n=1, cutoff=0.6)  # shown in the ontology's own case
        hint = f" Did you mean '{self.names()[table[close[0]]]}'?" if close else ""
        raise ValueError(
            f"anatomy label '{label}' is not in the ontology.{hint} "
            f"Labels are paths Region[/Organ[/Structure]] of the ontology file."
        )

    def _lowered_index(self) -> dict[str, int]:
        cache = self.__dict__.get("_lowered")
        if cache is None:
            cache = {n.lower(): i for i, n in enumerate(self.names())}
            object.__setattr__(self, "_lowered", cache)
        return cache

    def descendant_matrix(self) -> np.ndarray:
        """`D[i, j] = 1` when node j is node i or below it: the max-constraint's reach."""
        n = self.num_classes
        d = np.eye(n, dtype=np.float32)
        for j in range(n):
            i = self.parents[j]
            while i >= 0:
                d[i, j] = 1.0
                i = self.parents[i]
        return d

    def label_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Targets and known-masks per label node, with one extra last row for "no label".

        For a label ending at node k, the target is 1 on k and its ancestors. Every class is known
        (contributes to the loss) except the strict descendants of k: we do not know which of them
        the image shows. Other branches are known negatives. "No label" knows nothing.

        Returns:
            `(targets, known)`, both float32 `[num_classes + 1, num_classes]`.
        """
        d = self.descendant_matrix()
        n = self.num_classes
        targets = np.zeros((n + 1, n), dtype=np.float32)
        known = np.zeros((n + 1, n), dtype=np.float32)
        targets[:n] = d.T  # row k: ancestors-or-self of k
        known[:n] = 1.0 - d + np.eye(n, dtype=np.float32)  # all but strict descendants
        return targets, known


def load_ontology(source: str | Path = DEFAULT_ONTOLOGY) -> Ontology:
    """Read an ontology YAML file, or the shipped default for `"default"`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid ontology.
    """
    if str(source) == DEFAULT_ONTOLOGY:
        text = resources.files("echocare_core.resources").joinpath("ontology.yaml").read_text("utf-8")
        return Ontology.from_tree(yaml.safe_load(text), "default ontology")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"ontology file not found: {path} (use 'default' for the shipped one)")
    try:
        tree = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return Ontology.from_tree(tree, str(path))
