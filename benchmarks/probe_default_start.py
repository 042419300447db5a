"""Would a material's default appearance be a better ranking start than its predictor's proposal?

For one reference and a few materials: rank them as the fit does (``rank_materials``: the
predictor's proposal as it is, and with the measured geometry), then render each material's
default parameters with the same measured geometry (noise and tone matched the same way) at the
first working scale, and print the descriptor distance, structure distance, polarity and count
of every start. The evidence for the third start the fit now takes for sparse references
(``rank_materials(..., sparse=True)``; docs/decisions.md, "Measurement: SEM edges end on their
crest; ..."); the ranking here runs without it, so its own two starts are what the fit had.

    python benchmarks/probe_default_start.py IMAGE optical_brightfield_colloids,optical_emulsion_droplets
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("materials", help="comma-separated material ids")
    args = ap.parse_args(argv)
    import torch
    from fitting.core.events import CancelToken
    from fitting.core.runtime import init_mitsuba
    from fitting.describe.descriptor import descriptor_distance
    from fitting.fit.candidates import match_noise, match_tone, measure_render, rank_materials
    from fitting.fit.options import FitOptions
    from fitting.fit.pipeline import prepare_target
    from fitting.fit.refine import describe_in, loss_precision
    from fitting.fit.structure import impose_geometry, structure_distance, structure_terms
    from fitting.materials.library import load_library
    from fitting.materials.scene import MaterialScene, RenderSettings
    from fitting.reference.loading import load_reference
    init_mitsuba("cpu")
    full = load_library()
    lib = {m: full[m] for m in args.materials.split(",")}
    opts = FitOptions()
    p = prepare_target(load_reference(args.image), opts, lib, cancel=CancelToken(), timings={})
    m = p.measurement
    print(f"reference: polarity {m.polarity}, {m.count} particles, median {m.median_px:.1f} px, coverage {m.coverage:.4f}")
    scenes = {k: MaterialScene(mat, RenderSettings(size=opts.size, spp=opts.spp, layout_seed=opts.seed))
              for k, mat in lib.items()}
    entries: list[dict] = []
    rank_materials(p.library, scenes, p.target, p.descriptor, opts, lambda *a, **k: None, CancelToken(),
                   structures=p.structures, all_entries=entries)
    rows = [(e["material"], e["scale"], e["start"], e["descriptor_distance"], e["structure_distance"],
             e["render_measurement"]) for e in entries]
    quant = p.target.by_scale[p.target.scales[0]]["quantiles"]
    precision = loss_precision(opts, p.descriptor.device)
    s = p.target.scales[0]
    st = p.structures[s]
    for mid, mat in lib.items():
        x = match_noise(mat, mat.default_vector(), p.target.noise)
        x = impose_geometry(mat, x, st.diameter_render, st.coverage, st.measurement.gsd,
                            st.measurement.shape.get("elongation"))
        x, img = match_tone(scenes[mid], x, quant, opts.seed + 17)
        mr = measure_render(img)
        with torch.no_grad():
            dvec = describe_in(p.descriptor, img[None, None], precision)
        d = float(descriptor_distance(dvec, p.target.by_scale[s]["descriptor"]).mean())
        rows.append((mid, s, "default appearance", d, structure_distance(structure_terms(st, mr), st.weights), mr))
    print("| material | scale | start | descriptor | structure | polarity | count |")
    print("|---|---|---|---|---|---|---|")
    for mid, sc, start, d, sd, mr in rows:
        print(f"| {mid} | {sc} | {start} | {d:.3f} | {sd:.2f} | {mr.polarity if mr else '-'} | {mr.count if mr else '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
