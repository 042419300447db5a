"""Which instrument made the reference: SEM, TEM or optical microscope.

A user can say it (one click in the window, ``--imaging`` on the command line); otherwise the
file's vendor tags decide when they name the technique, and else the image's own cues:

* a round aperture with a black surround is an optical probe or eyepiece image;
* ring-shaped particle outlines (dark rims, light interiors) are optical bright field;
* particles darker than a light background are TEM bright field or optical bright field
  (mass-thickness contrast and absorption both darken particles);
* particles brighter than the background *and ringed by a dark halo* are optical bright field
  (refraction and defocus make dark Becke rings around transparent spheres; an SEM substrate
  next to a particle is never darker than the substrate far from it);
* other particles brighter than the background are SEM secondary-electron images (edges and
  tops emit more electrons than the substrate).

A user's choice, a tag or an aperture restrict the candidates to that kind (``hard``). The
other cues are reported and never exclude a material: SEM detector shadows also darken the
substrate next to a particle, and a dark-on-light SEM image or an optical probe image without
its aperture exist. The fit compares each candidate render's polarity and outlines with the
reference's instead. The result always says which cue decided.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

IMAGING_KINDS = ("sem", "tem", "optical")
IMAGING_CHOICES = ("auto",) + IMAGING_KINDS

#: Kinds consistent with the measured particle polarity.
_KINDS_BY_POLARITY = {
    "bright": ("sem",),
    "dark": ("tem", "optical"),
    "outline": ("optical",),
}


@dataclass
class ImagingGuess:
    """The instrument kinds the fit considers, and why.

    Attributes
    ----------
    kinds : tuple of str
        Imaging kinds whose materials are candidates, most likely first.
    cue : str
        What decided: ``"user"``, ``"tags"``, ``"aperture"``, ``"rings"``, ``"polarity"`` or
        ``"none"``.
    reason : str
        One sentence for the user (shown in the window, the CLI and the recipe).
    confidence : float
        0..1; 1 for a user's choice or a vendor tag.
    """

    kinds: tuple[str, ...]
    cue: str
    reason: str
    confidence: float = 1.0
    hard: bool = True
    details: dict = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        """The single kind when the cue named one, else None (several are candidates)."""
        return self.kinds[0] if len(self.kinds) == 1 else None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "kinds": list(self.kinds), "cue": self.cue, "reason": self.reason,
                "confidence": round(float(self.confidence), 3), "restricts": self.hard}


#: A halo counts as a dark ring when its median is this many background noise sigmas below the
#: background and most of its pixels are clearly (2 sigma) darker.
RING_SIGMAS = 2.0
RING_DARK_SHARE = 0.3


def dark_ring_contrast(gray, labels, valid=None, diameter_px: float | None = None) -> dict:
    """How much darker than the background the band just outside the particles is.

    Parameters
    ----------
    gray : (H, W) ndarray
        The image, float in [0, 1].
    labels : (H, W) int ndarray
        Measured particles (0 = background), e.g. ``ParticleMeasurement.labels``.
    valid : (H, W) bool ndarray, optional
        Pixels to use.
    diameter_px : float, optional
        Typical particle diameter; the band is a quarter of it wide (at least 1 px).

    Returns
    -------
    dict
        ``sigmas``: the band's median minus the background's, in background noise sigmas
        (negative = darker); ``dark_share``: the band's share of pixels 2 sigma below the
        background; ``ringed``: both beyond :data:`RING_SIGMAS` / :data:`RING_DARK_SHARE`.
    """
    g = np.asarray(gray, dtype=np.float32)
    v = np.ones(g.shape, bool) if valid is None else np.asarray(valid, bool)
    mask = np.asarray(labels) > 0
    out = {"sigmas": 0.0, "dark_share": 0.0, "ringed": False}
    if not mask.any():
        return out
    r = max(1, int(round(0.25 * (diameter_px or 4.0))))
    grown = ndi.binary_dilation(mask, iterations=r)
    band = grown & ~mask & v
    far = v & ~ndi.binary_dilation(grown, iterations=r)
    if band.sum() < 20 or far.sum() < 100:
        return out
    bg = g[far]
    lo, hi = np.percentile(bg, [1, 99])
    hist, edges = np.histogram(bg, 128, (float(lo), float(hi) + 1e-6))
    level = float(edges[np.argmax(hist)] + 0.5 * (edges[1] - edges[0]))
    sigma = float(1.4826 * np.median(np.abs(bg - np.median(bg)))) + 1e-6
    sig = float((np.median(g[band]) - level) / sigma)
    share = float((g[band] < level - 2.0 * sigma).mean())
    return {"sigmas": sig, "dark_share": share, "ringed": bool(sig <= -RING_SIGMAS and share >= RING_DARK_SHARE)}


def check_imaging_choice(choice: str | None) -> str:
    """Validate a user's imaging choice (None means ``auto``)."""
    from fitting.core.errors import MatfitError
    choice = (choice or "auto").lower()
    if choice not in IMAGING_CHOICES:
        raise MatfitError(f"imaging must be one of {', '.join(IMAGING_CHOICES)}, got {choice!r}",
                          hint="auto reads the file's tags and the image; sem, tem or optical restrict "
                               "the candidates to that instrument")
    return choice


def guess_imaging(choice: str | None = "auto", *, tag_kind: str | None = None, tag_cue: str | None = None,
                  aperture: bool = False, polarity: str | None = None,
                  polarity_confidence: float = 0.0, dark_rings: bool = False) -> ImagingGuess:
    """Decide which instrument kinds to consider.

    Parameters
    ----------
    choice : {"auto", "sem", "tem", "optical"}
        The user's choice; anything but ``auto`` is final.
    tag_kind, tag_cue : str, optional
        The kind named by the file's vendor tags and the tag that said it
        (:attr:`fitting.reference.loading.ReferenceImage.imaging_tag`).
    aperture : bool
        Whether a round aperture with a black surround was found.
    polarity : {"bright", "dark", "outline"}, optional
        Measured particle polarity (:class:`fitting.measure.particles.ParticleMeasurement`).
    polarity_confidence : float
        The measurement's confidence in that polarity (0..1). Below 0.3 every kind stays a
        candidate.
    dark_rings : bool
        Whether bright particles are ringed by a dark halo (:func:`dark_ring_contrast`).

    Returns
    -------
    ImagingGuess
    """
    choice = check_imaging_choice(choice)
    if choice != "auto":
        return ImagingGuess((choice,), "user", f"{choice.upper()} chosen by the user")
    if tag_kind in IMAGING_KINDS:
        return ImagingGuess((tag_kind,), "tags", f"{tag_kind.upper()}: {tag_cue or 'the file tags say so'}")
    if aperture:
        return ImagingGuess(("optical",), "aperture", "optical: a round aperture with a black surround",
                            confidence=0.9)
    if polarity == "bright" and dark_rings and polarity_confidence >= 0.3:
        return ImagingGuess(("optical",), "rings", "optical: bright particles ringed by dark halos (bright-field "
                            "refraction rings)", confidence=float(polarity_confidence), hard=False,
                            details={"polarity": polarity})
    if polarity in _KINDS_BY_POLARITY and polarity_confidence >= 0.3:
        kinds = _KINDS_BY_POLARITY[polarity]
        words = {"bright": "particles brighter than a dark background (secondary-electron contrast)",
                 "dark": "particles darker than a light background (bright-field transmission)",
                 "outline": "ring-shaped particle outlines (optical bright field)"}[polarity]
        return ImagingGuess(kinds, "polarity", f"{'/'.join(k.upper() for k in kinds)}: {words}",
                            confidence=float(polarity_confidence), hard=False, details={"polarity": polarity})
    return ImagingGuess(IMAGING_KINDS, "none", "no cue was clear enough: every instrument kind is a candidate",
                        confidence=0.0, hard=False)


def ring_status(gray, measurement, valid=None) -> bool | None:
    """Whether the measured bright particles are ringed by dark halos (:func:`dark_ring_contrast`);
    None when the particles are not bright or none were found. Kept in the measurement's
    ``diagnostics["ringed"]`` (and read from there when present), so it is reported with it."""
    if measurement is None:
        return None
    if "ringed" in measurement.diagnostics:
        return measurement.diagnostics["ringed"]
    ringed = None
    if measurement.polarity == "bright" and measurement.count:
        ringed = dark_ring_contrast(gray, measurement.labels, valid, measurement.median_px)["ringed"]
    measurement.diagnostics["ringed"] = ringed
    return ringed


def guess_imaging_of(ref, measurement, choice: str | None = "auto") -> ImagingGuess:
    """:func:`guess_imaging` from a loaded reference and its particle measurement."""
    rings = bool(ring_status(ref.cropped, measurement, ref.cropped_mask))
    return guess_imaging(choice, tag_kind=ref.imaging_tag, tag_cue=ref.imaging_tag_cue,
                         aperture=ref.valid_mask is not None,
                         polarity=None if measurement is None else measurement.polarity,
                         polarity_confidence=0.0 if measurement is None else measurement.confidence.get("polarity", 0.0),
                         dark_rings=rings)
