"""The measured structure of the reference, and how far a candidate render is from it.

A microscopist judges a fit first by the particles' size, how many there are and their kind;
the texture descriptor alone rates mostly empty or smooth renders close to many micrographs.
So the fit measures the reference (:func:`fitting.measure.measure_particles`), picks the
working scale that puts the measured particles at a size the materials render well, starts
each material's geometry from the measurement, measures each candidate render the same way,
and adds the difference to the descriptor distance.

Measuring reference and render with the same method makes the method's own biases (how it
splits touching particles, where it puts an edge) largely cancel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Particle diameter (render pixels) the working scale aims for: large enough for VGG's
#: early layers to see each particle's outline and texture, small enough that a 256 px
#: render holds many particles.
TARGET_RENDER_DIAMETER = 24.0
#: Geometry parameters that set the particle size, by geometry kind (render pixels).
SIZE_PARAM = {"spheres": "size_mean", "polyhedra": "size_mean", "crystals": "size_mean",
              "ellipsoids": "size_mean", "agglomerates": "primary_size", "rods": "diameter"}
#: Weights of the structure terms (each term is about 1 when the render is clearly off):
#: size off by a factor 1.5, coverage off by 0.15, the other polarity, branched against separate
#: particles (0.3 for round against faceted).
#: ``cluster``: connected clusters (agglomerates) off by a factor 1.5 in equivalent diameter.
#: The instrument enters only through what the render shows too (polarity, ring outlines);
#: see docs/decisions.md, "Fit: measurement steering", for the cues left out.
STRUCTURE_TERMS = {"size": 1.0, "coverage": 1.0, "polarity": 1.0, "shape": 1.0, "cluster": 0.25}
#: The reference measurement's confidence that scales each term: a number the measurement
#: itself doubts (watershed and granulometry disagreeing on the size, say) steers less.
TERM_CONFIDENCE = {"size": "diameter", "cluster": "diameter", "coverage": "coverage", "polarity": "polarity",
                   "shape": "shape"}
#: Share of a term's weight kept at zero confidence, so that an empty or grossly wrong render
#: still ranks behind.
CONFIDENCE_FLOOR = 0.5


@dataclass
class StructureTarget:
    """The reference's measured structure, expressed at the fit's working scale.

    Attributes
    ----------
    measurement : ParticleMeasurement
        Of the reference at full resolution (reference pixels).
    render_per_reference_px : float
        Working-scale pixels per reference pixel (the working image's longer side over the
        cropped reference's).
    """

    measurement: object
    render_per_reference_px: float
    details: dict = field(default_factory=dict)

    @property
    def diameter_render(self) -> float | None:
        """The measured median diameter in working-scale (render) pixels."""
        d = self.measurement.median_px
        return None if d is None else float(d) * self.render_per_reference_px

    @property
    def weights(self) -> dict[str, float]:
        """:data:`STRUCTURE_TERMS` scaled by the measurement's confidence in each number
        (:data:`TERM_CONFIDENCE`, never below :data:`CONFIDENCE_FLOOR`)."""
        return confidence_weights(self.measurement.confidence)

    @property
    def coverage(self) -> float:
        return float(self.measurement.coverage)

    @property
    def polarity(self) -> str:
        return self.measurement.polarity

    @property
    def shape_class(self) -> str | None:
        return self.measurement.shape.get("class")


def confidence_weights(confidence: dict, floor: float = CONFIDENCE_FLOOR,
                       base: dict[str, float] | None = None) -> dict[str, float]:
    """Term weights ``base`` (default :data:`STRUCTURE_TERMS`) scaled by
    ``floor + (1 - floor) * confidence`` of the number each term compares."""
    base = STRUCTURE_TERMS if base is None else base
    out = {}
    for k, w in base.items():
        c = float(confidence.get(TERM_CONFIDENCE.get(k, ""), 1.0))
        out[k] = w * (floor + (1.0 - floor) * min(max(c, 0.0), 1.0))
    return out


def cluster_area(m) -> float | None:
    """Area-weighted median projected area (px^2) of the measurement's connected clusters that
    hold more than one particle's area: the size of the agglomerate a typical primary belongs
    to (None: no clusters). Weighted by area so that many small fragments do not hide the few
    large aggregates that make up most of the particles."""
    if m is None or m.median_px is None:
        return None
    cached = getattr(m, "_cluster_area", "unset")
    if cached != "unset":
        return cached
    from skimage import measure as skm
    primary = math.pi / 4.0 * float(m.median_px) ** 2
    areas = np.array([r.area for r in skm.regionprops(skm.label(np.asarray(m.labels) > 0))], float)
    areas = areas[areas > 1.5 * primary]
    if areas.size:
        order = np.sort(areas)
        cum = np.cumsum(order)
        value = float(order[np.searchsorted(cum, 0.5 * cum[-1])])
    else:
        value = None
    m._cluster_area = value
    return value


def measurement_is_usable(m) -> bool:
    """A measurement steers the fit when it found particles and a clean threshold."""
    return (m is not None and m.median_px is not None and m.count >= 3
            and float(m.confidence.get("coverage", 0.0)) >= 0.2)


def working_scale(longest_side: int, diameter_px: float | None, render_size: int,
                  target_diameter: float | None = None) -> int:
    """Longer side (px) of the working image that shows particles of ``diameter_px``
    reference pixels at ``target_diameter`` render pixels (default
    :data:`TARGET_RENDER_DIAMETER`, whatever the render size: it is the descriptor's view of a
    particle that matters, not how many fit in a render).

    Never upsamples (at most ``longest_side``) and never goes below three quarters of a render,
    so the reference still fills the descriptor's tiles; very large particles then render
    larger than ``target_diameter``.
    """
    if diameter_px is None or not diameter_px > 0:
        return int(longest_side)
    if target_diameter is None:
        target_diameter = TARGET_RENDER_DIAMETER
    s = longest_side * target_diameter / float(diameter_px)
    return int(round(min(longest_side, max(0.75 * render_size, s))))


def working_scales(longest_side: int, diameter_px: float | None, render_size: int) -> tuple[int, ...]:
    """The working scales a measured reference is fitted at: the one that puts its particles
    at the target render size, and twice finer, so that texture inside the
    particles (primaries of compact agglomerates, surface relief) is not averaged away when the
    measured "particle" is a cluster. Each candidate keeps the scale it matches best; the
    geometry is set from the measurement at every scale, so particle sizes match at all."""
    s = working_scale(longest_side, diameter_px, render_size)
    return tuple(dict.fromkeys(int(min(longest_side, k * s)) for k in (1, 2)))


def impose_geometry(material, x: np.ndarray, diameter_render: float | None, coverage: float | None,
                    gsd: float | None = None, elongation: float | None = None,
                    primary_count: float | None = None) -> np.ndarray:
    """``x`` with the geometry set from a measurement (values clipped to the material's ranges).

    Parameters
    ----------
    material : Material
    x : ndarray
        Normalised parameter vector.
    diameter_render : float, optional
        Particle (primary) diameter in render pixels; for rods the equivalent-circle diameter
        of the projection, split into length and width with ``elongation``.
    coverage : float, optional
        Projected area fraction.
    gsd : float, optional
        Geometric standard deviation of the diameters.
    elongation : float, optional
        Major / minor axis of the projections (rods and elongated polyhedra).
    primary_count : float, optional
        Primaries per agglomerate (agglomerate kinds).
    """
    x = np.asarray(x, dtype=np.float64).copy()
    names = material.names

    def put(name: str, value: float | None) -> None:
        if value is None or name not in names or not math.isfinite(value):
            return
        spec = material.spec(name)
        x[names.index(name)] = float(np.clip(spec.to_normalized(min(max(value, spec.min), spec.max)), 0, 1))

    kind = material.geometry_kind
    if diameter_render is not None:
        if kind == "rods":
            e = max(1.5, float(elongation or 4.0))
            width = diameter_render * math.sqrt(math.pi / (4.0 * e))
            put("diameter", width)
            put("length_mean", width * e)
        else:
            put(SIZE_PARAM.get(kind, "size_mean"), diameter_render)
    if coverage is not None and "second_coverage" in names and "coverage" in names:
        # The measured coverage is both populations': split it as the proposal splits it.
        main, second = physical_value(material, x, "coverage"), physical_value(material, x, "second_coverage")
        share = second / max(main + second, 1e-9)
        put("second_coverage", coverage * share)
        coverage = coverage * (1.0 - share)
    put("coverage", coverage)
    if gsd is not None and kind != "agglomerates":
        put("size_gsd", gsd)
    if elongation is not None and kind == "polyhedra":
        put("elongation", elongation)
    if primary_count is not None and kind == "agglomerates":
        put("primary_count", primary_count)
    return x


def physical_value(material, x: np.ndarray, name: str) -> float | None:
    """Parameter ``name``'s physical value in the normalised vector ``x`` (None if the material has none)."""
    if name not in material.names:
        return None
    return float(material.spec(name).to_physical(float(x[material.names.index(name)])))


def rendered_size_param(material, x: np.ndarray) -> float | None:
    """The size parameter's physical value (render pixels) in ``x``."""
    name = "diameter" if material.geometry_kind == "rods" else SIZE_PARAM.get(material.geometry_kind, "size_mean")
    return physical_value(material, x, name)


def correct_geometry(material, x: np.ndarray, target: StructureTarget, render_measurement,
                     clusters: bool = False) -> np.ndarray:
    """One correction step: scale the size parameter by target / measured-on-render diameter and
    shift coverage by the measured difference, so the render *measures* like the reference.
    With ``clusters`` (a render field large enough to hold the reference's aggregates), an
    agglomerate material's primaries per aggregate are scaled by the reference's over the
    render's cluster area too (a projected aggregate's area grows about linearly with its
    primaries below fractal dimension 2)."""
    m = render_measurement
    x = np.asarray(x, dtype=np.float64).copy()
    d_t = target.diameter_render
    if d_t is None or m is None or m.median_px is None or m.count < 2:
        return x
    ratio = float(np.clip(d_t / float(m.median_px), 1 / 3, 3.0))
    cur = rendered_size_param(material, x)
    cov_now = physical_value(material, x, "coverage")
    if cov_now is not None:
        cov_now += physical_value(material, x, "second_coverage") or 0.0
    new_cov = None if cov_now is None else cov_now + float(np.clip(target.coverage - m.coverage, -0.25, 0.25))
    e = target.measurement.shape.get("elongation")
    # Without ``clusters`` primaries per agglomerate are left to the proposal: a ranking render
    # (256 px) cannot hold an aggregate as large as the few big ones of a sparse TEM field, and
    # forcing their size leaves a render with one cut aggregate whose coverage and texture match
    # nothing.
    count = None
    if clusters and material.geometry_kind == "agglomerates" and target.shape_class == "branched":
        a_t, a_r = target_cluster_area(target), cluster_area(m)
        n_now = physical_value(material, x, "primary_count")
        if a_t and a_r and n_now:
            count = n_now * float(np.clip(a_t / a_r, 1 / 3, 3.0))
    return impose_geometry(material, x, None if cur is None else cur * ratio, new_cov,
                           elongation=e if material.geometry_kind == "rods" else None, primary_count=count)


def target_cluster_area(target: StructureTarget) -> float | None:
    """The reference's median cluster area in render pixels squared."""
    a = cluster_area(target.measurement)
    return None if a is None else a * target.render_per_reference_px ** 2


def structure_terms(target: StructureTarget, render_measurement) -> dict[str, float]:
    """Each structure term of a render's measurement against the reference's (0 = same).

    The instrument enters through what both images show, measured the same way (polarity,
    ring outlines): a cue read off the reference alone would penalise a material whose
    renders show that cue too."""
    m = render_measurement
    ref = target.measurement
    terms = {"size": 0.0, "coverage": 0.0, "polarity": 0.0, "shape": 0.0, "cluster": 0.0}
    if not has_particles(m):
        # Nothing measurable on the render where the reference has particles: the empty or
        # smooth field the texture descriptor alone tends to rate close. The worst size and
        # coverage terms.
        terms.update(size=3.0, coverage=3.0)
        return terms
    d_t = target.diameter_render
    if d_t:
        terms["size"] = abs(math.log(float(m.median_px) / d_t)) / math.log(1.5)
    # Coverage off by 0.15, or by a factor 3 in a sparse field (0.003 against 0.03 is a
    # handful of particles against dozens, though only 0.03 apart).
    c_r, c_t = float(m.coverage), float(ref.coverage)
    terms["coverage"] = max(abs(c_r - c_t) / 0.15, abs(math.log((c_r + 0.01) / (c_t + 0.01))) / math.log(3.0))
    if ref.polarity != m.polarity:
        terms["polarity"] = 1.0
    a, b = ref.shape.get("class"), m.shape.get("class")
    if a and b and a != b:
        # Chains or aggregates against separate particles is a different kind of specimen;
        # round against faceted is a matter of degree.
        terms["shape"] = 1.0 if "branched" in (a, b) else 0.3
    a_t = target_cluster_area(target) if ref.shape.get("class") == "branched" else None
    if a_t:
        a_r = cluster_area(m) or math.pi / 4.0 * float(m.median_px) ** 2   # no clusters: single particles
        terms["cluster"] = abs(0.5 * math.log(a_r / a_t)) / math.log(1.5)
    return {k: float(min(v, 3.0)) for k, v in terms.items()}


def has_particles(m) -> bool:
    """Whether a measurement found any particle with a size."""
    return m is not None and m.count > 0 and m.median_px is not None


def combined_score(descriptor_distance: float, structure_distance_: float, weight: float) -> float:
    """The ranking and final-choice score: the descriptor distance scaled up by the structure
    distance. A product, not a sum, because descriptor distances have no fixed scale (they
    differ several-fold between references and working scales) while the structure terms do."""
    return float(descriptor_distance * (1.0 + weight * structure_distance_))


def structure_distance(terms: dict[str, float], weights: dict[str, float] | None = None) -> float:
    """Weighted sum of :func:`structure_terms`."""
    w = weights or STRUCTURE_TERMS
    return float(sum(w.get(k, 0.0) * v for k, v in terms.items()))


def size_summary(m, reference_px_per_unit: float = 1.0, field_scale: float = 1.0) -> dict:
    """Count, median, geometric mean diameter and GSD of a measurement, with diameters divided
    by ``reference_px_per_unit`` (render px per reference px to express a render in reference
    pixels) and the count multiplied by ``field_scale`` (reference field area over the measured
    field's)."""
    if m is None:
        return {"count": 0, "median": None, "gmean": None, "gsd": None, "coverage": 0.0}
    k = 1.0 / reference_px_per_unit

    def sc(v):
        return None if v is None else float(v) * k
    return {"count": int(round(m.count * field_scale)), "median": sc(m.median_px), "gmean": sc(m.gmean_px),
            "gsd": None if m.gsd is None else float(m.gsd), "coverage": float(m.coverage)}
