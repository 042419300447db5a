"""`matfit-gui [IMAGE] [--screenshot PNG [--fit]]`: start the matfit window.

Qt is imported inside :func:`main` only: the engine process is started with 'spawn', which
re-imports the main script, and it must not pay for (or initialise) Qt.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SETTLE_MS = 800           # let layouts, pixmaps and the first paint settle before a screenshot
SCREENSHOT_LIMIT_S = 900  # never hang forever in --screenshot mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matfit-gui", description="Fit a material recipe to a micrograph, visually.")
    p.add_argument("image", nargs="?", help="a micrograph (or a recipe .json) to open")
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window to PNG and exit")
    p.add_argument("--fit", action="store_true", help="run the fit first (with --screenshot: shoot when it ends)")
    p.add_argument("--budget", type=float, help="fit time budget in seconds (this run only)")
    p.add_argument("--iterations", type=int, help="refinement iterations per candidate (this run only)")
    p.add_argument("--materials", help="comma-separated material ids to restrict the fit to")
    p.add_argument("--imaging", choices=("auto", "sem", "tem", "optical"),
                   help="the instrument (this run only): sem, tem or optical restrict the candidates")
    p.add_argument("--pixel-size", type=float, metavar="NM", help="pixel size of the image in nm (this run only)")
    return p


def apply_dark_palette(app) -> None:
    from PySide6.QtGui import QColor, QPalette
    app.setStyle("Fusion")
    pal = QPalette()
    base, window, text = QColor(36, 36, 40), QColor(45, 45, 50), QColor(225, 225, 230)
    for role, colour in ((QPalette.ColorRole.Window, window), (QPalette.ColorRole.WindowText, text),
                         (QPalette.ColorRole.Base, base), (QPalette.ColorRole.AlternateBase, window),
                         (QPalette.ColorRole.ToolTipBase, QColor(60, 60, 66)),
                         (QPalette.ColorRole.ToolTipText, text), (QPalette.ColorRole.Text, text),
                         (QPalette.ColorRole.Button, window), (QPalette.ColorRole.ButtonText, text),
                         (QPalette.ColorRole.BrightText, QColor(255, 90, 90)),
                         (QPalette.ColorRole.Highlight, QColor(70, 130, 200)),
                         (QPalette.ColorRole.HighlightedText, QColor(255, 255, 255)),
                         (QPalette.ColorRole.Link, QColor(110, 170, 240)),
                         (QPalette.ColorRole.PlaceholderText, QColor(130, 130, 136))):
        pal.setColor(role, colour)
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, QColor(120, 120, 126))
    app.setPalette(pal)


def create_application(argv: list[str]):
    from PySide6.QtWidgets import QApplication

    from .qtfix import protect_singletons
    protect_singletons()   # before Qt does any work: see app/qtfix.py
    app = QApplication.instance() or QApplication(argv)
    app.setOrganizationName("matfit")
    app.setApplicationName("matfit-gui")
    apply_dark_palette(app)
    return app


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.screenshot and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")   # headless screenshot (CI, docs)
    app = create_application(sys.argv[:1])
    from PySide6.QtCore import QTimer

    from .main_window import MainWindow
    window = MainWindow()
    overrides = {k: v for k, v in (("budget_s", args.budget), ("iterations", args.iterations)) if v is not None}
    if args.materials:
        overrides["materials"] = [m.strip() for m in args.materials.split(",") if m.strip()]
    if args.imaging:
        overrides["imaging"] = args.imaging
    window.set_fit_options(**overrides)
    if args.pixel_size is not None:
        # after the image's own pixel size has filled the field (connected after the window's slot)
        window.model.referenceChanged.connect(lambda: window.set_fit_options(pixel_size_nm=args.pixel_size))
    window.show()
    exit_code = 0

    if args.fit and args.image:
        def fit_once_loaded() -> None:
            window.model.referenceChanged.disconnect(fit_once_loaded)
            window.start_fit()
        window.model.referenceChanged.connect(fit_once_loaded)

    if args.screenshot:
        out = Path(args.screenshot)

        def shoot() -> None:
            nonlocal exit_code
            out.parent.mkdir(parents=True, exist_ok=True)
            if window.grab().save(str(out)):
                print(f"matfit-gui: screenshot saved to {out}", file=sys.stderr)
            else:
                print(f"matfit-gui: cannot write {out}", file=sys.stderr)
                exit_code = 1
            window.close()
            app.quit()

        def settle_then_shoot() -> None:
            QTimer.singleShot(SETTLE_MS, shoot)

        def give_up() -> None:
            nonlocal exit_code
            print("matfit-gui: gave up waiting; taking the screenshot as it is", file=sys.stderr)
            exit_code = 1
            shoot()

        def fit_ended(fit_state: str) -> None:
            nonlocal exit_code
            if fit_state in ("finished", "failed", "cancelled"):
                exit_code = 0 if fit_state == "finished" else 1
                settle_then_shoot()

        QTimer.singleShot(SCREENSHOT_LIMIT_S * 1000, give_up)
        if not args.image:
            settle_then_shoot()
        elif args.fit:
            window.model.fitStateChanged.connect(fit_ended)
        else:
            window.model.referenceChanged.connect(settle_then_shoot)
        # A file that cannot be opened shows its dialog; shoot anyway so that the run ends.
        window.referenceLoadFailed.connect(lambda _message: settle_then_shoot())

    if args.image:
        window.open_path(args.image)
    app.exec()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
