"""The material library: node graphs and parameter specs authored as data (``library``,
``graph``, ``nodes``, ``params``), a material bound to render settings (``scene``), and the
recipe that stores a material with its parameter values (``recipe``)."""
