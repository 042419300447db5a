"""matfit's engine: a real micrograph in, a fitted material recipe and labelled renders out.

Data flows one way, and each stage is a subpackage that imports only the ones before it:

``core``       errors, progress events and cancellation, the Mitsuba/Dr.Jit runtime, atomic writes
``reference``  reading a micrograph: decoding, data bar and aperture, pixel size from its tags
``measure``    what a microscopist measures first: particles, their size distribution, coverage, shape
``describe``   VGG texture descriptors of images, FID/KID of synthetic sets
``render``     particle layouts (geometry), ray tracing, and the SEM/TEM/optical imaging models
``materials``  the material library (node graphs, parameter specs), a material bound to a renderer,
               and recipes (a material with its parameter values)
``fit``        candidates (predictors, ranking) and their refinement by differentiable rendering
``output``     what a recipe produces: bulk training sets, Mitsuba scenes, galleries
``cli``        the ``matfit`` command

No module imports Qt; ``app/`` drives this package and listens to its events.
"""
