"""The options of a fit (budget, render size, loss settings), validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

from fitting.core.errors import MatfitError

LOSS_PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class FitOptions:
    budget_s: float = 120.0          # whole fit, wall clock
    iterations: int = 60             # per candidate, at most
    size: int = 256                  # render/working resolution
    spp: int = 4
    seed: int = 0
    top_k: int = 3
    backbone: str = "vgg16-hed"
    preview_every: int = 5           # iterations between preview events
    lr: float = 0.04
    patience: int = 12               # whole-render iterations without improvement before stopping
    hist_weight: float = 1.0
    # Weight of the particles' ring-profile distance (fitting.fit.appearance) in the refinement
    # loss and in every refined candidate's distance; 0 turns it off.
    appearance_weight: float = 1.0
    # Side of the random square crop of each refinement render that the descriptor loss sees, as
    # a fraction of the render size (1 = the whole render): ``screen_loss_crop`` for the short
    # screening refinements, ``loss_crop`` for the final ones. A crop buys iterations, but one
    # crop's distance to the reference tiles' mean also rewards renders whose crops all look
    # alike, so the final refinement sees the whole render (docs/decisions.md, "Fit: loss crop").
    loss_crop: float = 1.0
    screen_loss_crop: float = 0.5
    materials: list[str] | None = None   # restrict the library (tests, power users)
    scales: tuple[int, ...] = (256, 384, 512, 768)   # reference working sizes (longer side, px)
    search_sizes: bool = True
    # Screening (off by default): the best ``screen`` materials are each refined briefly
    # (together ``screen_share`` of the budget) and re-ranked before the final ``top_k`` are
    # refined in full. A short refinement gains most on materials that start far off, so it
    # moved true materials out of the top 3 as often as into it (docs/decisions.md, "Fit: screening").
    screen: int = 0
    screen_share: float = 0.25
    # Arithmetic of the VGG passes of the ranking renders and of the refinement loss: "bfloat16"
    # (autocast), "float32", or "auto" = bfloat16 on CPUs with bfloat16 instructions, where it
    # is about twice as fast for the same loss; reported distances are always float32
    # (docs/decisions.md, "Fit: loss precision").
    loss_precision: str = "auto"
    # Instrument: "auto" (file tags, else image cues) or one of "sem", "tem", "optical", which
    # restricts the candidates to that kind's materials.
    imaging: str = "auto"
    # Measure the reference's particles and steer the fit by them: the working scale puts the
    # measured particles at TARGET_RENDER_DIAMETER render pixels, geometry starts from the
    # measurement, and ranking and the final choice multiply the descriptor distance by
    # (1 + ``structure_weight`` x the structure distance): size, coverage, polarity, shape of the
    # render measured the same way (fitting/fit/structure.py).
    measure: bool = True
    structure_weight: float = 0.5
    # The same for the final choice among the refined candidates, which are measured on a field
    # large enough to hold several of the reference's particles or aggregates (ranking renders
    # may hold one or two), so their measured structure is trusted more
    # (docs/decisions.md, "Fit: geometry settled on the judged field").
    final_structure_weight: float = 1.0
    # Of the ``top_k`` refined candidates, this many are the materials the library's classifier
    # finds most probable (fitting/fit/classifier.py, `matfit train --classifier`); the first
    # is always the ranking's best. 0, or no current classifier file: the ranking's best ``top_k``.
    classified_candidates: int = 2
    # The final choice multiplies each refined candidate's score by (1 + this x -ln p), p the
    # classifier's probability of its material: refined siblings often end within the noise of
    # a 256 px render's distance, and the classifier has seen each material's whole range
    # (docs/decisions.md, "Fit: a ranking that does not depend on the machine's speed; ...").
    final_classifier_weight: float = 0.3
    # Pixel size typed by the user (nm); None = from the file's tags, if any.
    pixel_size_nm: float | None = None
    # Refinement backtracks to its best point and halves the step when a loss jumps above
    # (1 + backtrack_jump) x the best loss so far (the loss of a stochastic render swings).
    backtrack_jump: float = 0.5

    def __post_init__(self) -> None:
        from fitting.measure.instrument import check_imaging_choice
        self.imaging = check_imaging_choice(self.imaging)
        if self.pixel_size_nm is not None and not float(self.pixel_size_nm) > 0:
            raise MatfitError(f"pixel_size_nm must be positive, got {self.pixel_size_nm}",
                              hint="give the pixel size in nanometres, e.g. 2.5, or leave it unset")
        if int(self.classified_candidates) < 0:
            raise MatfitError(f"classified_candidates must be >= 0, got {self.classified_candidates}",
                              hint="0 refines the ranking's best materials only")
        for name in ("structure_weight", "final_structure_weight", "final_classifier_weight", "appearance_weight"):
            if not float(getattr(self, name)) >= 0:
                raise MatfitError(f"{name} must be >= 0, got {getattr(self, name)}",
                                  hint="0 leaves that term out of the score (the structure weights: "
                                       "the texture descriptor alone decides)")
        for name in ("loss_crop", "screen_loss_crop"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise MatfitError(f"{name} must be a fraction in 0..1, got {getattr(self, name)}",
                                  hint="0.5 = a crop of half the render's side; 1 = the whole render")
        if self.loss_precision not in LOSS_PRECISIONS:
            raise MatfitError(f"loss_precision must be one of {', '.join(LOSS_PRECISIONS)}, got {self.loss_precision!r}",
                              hint="auto picks bfloat16 on CPUs with bfloat16 instructions, else float32")
        if int(self.screen) < 0 or not 0.0 <= float(self.screen_share) < 1.0:
            raise MatfitError(f"screen must be >= 0 and screen_share in [0, 1), got {self.screen}, "
                              f"{self.screen_share}", hint="screen 0 (or <= top_k) turns screening off")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["scales"] = list(self.scales)
        return d
