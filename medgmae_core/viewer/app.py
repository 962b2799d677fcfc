"""The web page of ``medgmae view``: ``trame`` (Vue 3 + Vuetify 3) with a ``trame-vtk`` remote 3D view.

Layout and event wiring only: every action calls :class:`~.session.ViewerSession` (load, predict, thresholds,
pick, slices, export) or :class:`~.scene3d.Scene3D` (the 3D view, rendered offscreen on the server and streamed
as images, so the browser needs no WebGL). Prediction runs on a worker thread (:class:`~.session.PredictJob`)
that an asyncio task polls for the progress bar. Errors (a missing file, a non-CT, a bad checkpoint) are shown in
the page and the server keeps running. This is the only module of ``medgmae_core`` that imports the web stack.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import sys
from pathlib import Path

from .scene3d import Scene3D
from .session import PLANES, PredictJob, ViewerSession, bundled_weights, error_text

log = logging.getLogger(__name__)


def _web():
    try:  # lazy: optional dependency (the [viewer] extra: trame, trame-vtk, trame-vuetify)
        from trame.app import asynchronous, get_server
        from trame.ui.vuetify3 import SinglePageLayout
        from trame.widgets import html, vtk as vtk_widgets, vuetify3 as v3
    except ImportError as exc:
        raise ImportError("`medgmae view` needs the web stack: pip install 'medgmae-core[viewer]' "
                          f"(trame, trame-vtk, trame-vuetify); {exc}") from None
    return get_server, asynchronous, SinglePageLayout, html, vtk_widgets, v3


class ViewerApp:
    """One page over one :class:`ViewerSession`."""

    def __init__(self, session: ViewerSession, *, name: str = "medgmae-view", export_dir: str | Path | None = None,
                 weights: str | None = None, mask_ratio: float = 0.75) -> None:
        get_server, self._asynchronous, SinglePageLayout, html, vtk_widgets, v3 = _web()
        self.session = session
        self.scene = Scene3D()
        self.job: PredictJob | None = None
        self.server = get_server(name, client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        bundled = bundled_weights()
        s = self.state
        s.trame__title = "MedGMAE viewer"
        s.update({
            "source": "", "source_label": "", "error": "", "status": "", "n_gaussians": 0, "n_visible": 0,
            "mask_ratio": float(mask_ratio), "weights": weights or "", "predicting": False, "progress": 0,
            "progress_text": "", "bundled": bundled.name if bundled else "none",
            "min_intensity": 0.0, "intensity_range": [0.0, 1.0], "size_range": [0.0, 10.0], "size_limits": [0.0, 10.0],
            "glyph_opacity": 0.6, "pick_index": None, "picked": "", "export_dir": str(Path(export_dir or Path.cwd() / "medgmae_view_out")),
            "export_message": "", **{f"{p}_pos": 0.5 for p in PLANES}, **{f"{p}_src": "" for p in PLANES},
        })
        self._build(SinglePageLayout, html, vtk_widgets, v3)
        for p in PLANES:
            s.change(f"{p}_pos")(lambda plane=p, **_: self._update_slice(plane))
        s.change("min_intensity", "size_range")(lambda **_: self._apply_thresholds())
        s.change("glyph_opacity")(lambda glyph_opacity, **_: self._set_opacity(glyph_opacity))

    # ------------------------------------------------------------------ layout
    def _build(self, SinglePageLayout, html, vtk_widgets, v3) -> None:
        ctrl = self.ctrl
        with SinglePageLayout(self.server, full_height=True) as layout:
            layout.title.set_text("MedGMAE viewer")
            layout.footer.hide()
            with layout.toolbar:
                v3.VSpacer()
                html.Div("{{ source_label }}", id="source-label", classes="text-body-2 mr-4")
            with layout.content:
                with v3.VContainer(fluid=True, classes="pa-2"):
                    html.Div("{{ error }}", id="error", v_show="error",
                             classes="pa-2 mb-2 text-white bg-red-darken-2 rounded")
                    with v3.VRow(dense=True):
                        with v3.VCol(cols=3):
                            self._controls(html, v3)
                        with v3.VCol(cols=9):
                            with v3.VRow(dense=True):
                                for p in PLANES:
                                    with v3.VCol(cols=4):
                                        html.Div(p, classes="text-caption")
                                        html.Img(src=(f"{p}_src",), id=f"slice-{p}",
                                                 style="width: 100%; aspect-ratio: 1; background: black;")
                                        v3.VSlider(v_model=(f"{p}_pos",), min=0, max=1, step=0.01,
                                                   density="compact", hide_details=True)
                            with v3.VRow(dense=True):
                                with v3.VCol(cols=8):
                                    with html.Div(id="view3d", style="width: 100%; height: 460px; position: relative;"):
                                        view = vtk_widgets.VtkRemoteView(
                                            self.scene.window, interactive_ratio=1, still_quality=90,
                                            picking_modes=("['click']",), click=(self._on_click, "[$event]"))
                                        ctrl.view_update = view.update
                                        ctrl.view_reset_camera = view.reset_camera
                                with v3.VCol(cols=4):
                                    html.Div("3D: ellipsoids coloured by intensity (blue faint, red bright) over "
                                             "the volume's surface; drag to rotate, click a Gaussian to pick it",
                                             classes="text-caption")
                                    html.Pre("{{ picked }}", id="picked", v_show="picked",
                                             classes="text-caption pa-2 mt-2 bg-grey-lighten-3")

    def _controls(self, html, v3) -> None:
        with v3.VCard(classes="pa-2 mb-2", title="Input"):
            v3.VTextField(v_model=("source",), label="CT, DICOM folder, output folder or PLY (empty: phantom)",
                          id="source-input", density="compact", hide_details=True)
            v3.VBtn("Open", id="open-button", click=self.open_source, classes="mt-2", size="small")
        with v3.VCard(classes="pa-2 mb-2", title="Predict"):
            html.Div("mask ratio {{ mask_ratio.toFixed(2) }}", classes="text-caption")
            v3.VSlider(v_model=("mask_ratio",), min=0.0, max=0.95, step=0.05, density="compact", hide_details=True)
            v3.VTextField(v_model=("weights",), label=("`checkpoint (empty: bundled ${bundled})`",),
                          id="weights-input", density="compact", hide_details=True)
            v3.VBtn("Predict", id="predict-button", click=self.start_predict, disabled=("predicting",),
                    classes="mt-2", color="primary", size="small")
            v3.VProgressLinear(model_value=("progress",), id="progress", height=6, classes="mt-2")
            html.Div("{{ progress_text }}", id="progress-text", classes="text-caption")
        with v3.VCard(classes="pa-2 mb-2", title="Gaussians"):
            html.Div("{{ n_visible }} of {{ n_gaussians }} Gaussians drawn", id="glyph-count", classes="text-body-2")
            html.Div("intensity >= {{ Number(min_intensity).toPrecision(3) }}", classes="text-caption")
            v3.VSlider(v_model=("min_intensity",), min=("intensity_range[0]",), max=("intensity_range[1]",),
                       step=("(intensity_range[1] - intensity_range[0]) / 100 || 0.01",), density="compact",
                       hide_details=True, id="intensity-slider")
            html.Div("largest sigma {{ Number(size_range[0]).toFixed(1) }} - {{ Number(size_range[1]).toFixed(1) }} mm",
                     classes="text-caption")
            v3.VRangeSlider(v_model=("size_range",), min=("size_limits[0]",), max=("size_limits[1]",),
                            step=("(size_limits[1] - size_limits[0]) / 100 || 0.1",), density="compact",
                            hide_details=True, id="size-slider")
            html.Div("glyph opacity {{ Number(glyph_opacity).toFixed(2) }}", classes="text-caption")
            v3.VSlider(v_model=("glyph_opacity",), min=0.1, max=1.0, step=0.05, density="compact", hide_details=True)
            v3.VTextField(v_model=("pick_index",), label="show Gaussian # (or click one in 3D)", type="number",
                          id="pick-input", density="compact", hide_details=True, update_modelValue=self.show_index)
        with v3.VCard(classes="pa-2", title="Export"):
            v3.VTextField(v_model=("export_dir",), label="folder", id="export-dir", density="compact",
                          hide_details=True)
            with html.Div(classes="mt-2"):
                for kind, label in (("ply", "PLY"), ("nifti", "NIfTI"), ("mrb", ".mrb")):
                    v3.VBtn(label, id=f"export-{kind}", click=(self.export, f"['{kind}']"), size="small",
                            classes="mr-1")
            html.Div("{{ export_message }}", id="export-message", classes="text-caption")
        html.Div("{{ status }}", id="status", classes="text-caption mt-2")

    # ------------------------------------------------------------------ actions
    def load(self, source: str | None) -> bool:
        """Load an input into the session and refresh everything; an error is shown, the old input stays."""
        s = self.state
        try:
            self.session.load(source or None)
        except Exception as exc:
            log.info("could not open %r: %s", source, exc)
            s.error = f"Could not open {source or 'the phantom'}: {error_text(exc)}"
            return False
        s.error = ""
        self._refresh_all(reset_camera=True)
        return True

    def open_source(self) -> None:
        with self.state:
            self.load(self.state.source)

    def predict_now(self) -> bool:
        """Predict on this thread (start-up ``--predict``); an error is shown in the page."""
        s = self.state
        job = PredictJob(self.session, mask_ratio=float(s.mask_ratio), weights=(s.weights or None))
        job.run()
        s.progress_text = job.message
        if job.error is not None:
            s.error = f"Prediction failed: {job.error}"
            return False
        s.progress = 100
        self._refresh_all(reset_camera=True)
        return True

    def start_predict(self) -> None:
        s = self.state
        if self.job is not None and self.job.running:
            return
        if not self.session.loaded:
            s.error = "Open a CT first"
            return
        s.error, s.predicting, s.progress, s.progress_text = "", True, 0, "starting"
        self.job = PredictJob(self.session, mask_ratio=float(s.mask_ratio), weights=(s.weights or None)).start()
        self._asynchronous.create_task(self._watch(self.job))

    async def _watch(self, job: PredictJob) -> None:
        while job.running:
            with self.state:
                self.state.progress, self.state.progress_text = round(100 * job.fraction), job.message
            await asyncio.sleep(0.25)
        with self.state:
            s = self.state
            s.predicting = False
            s.progress = 100 if job.error is None else 0
            s.progress_text = job.message
            if job.error is not None:
                s.error = f"Prediction failed: {job.error}"
            else:
                self._refresh_all(reset_camera=True)

    def _apply_thresholds(self) -> None:
        th = self.session.thresholds
        s = self.state
        if self.session.gaussians is None:
            return
        lo_i = float(s.intensity_range[0])
        th.min_intensity = float(s.min_intensity) if float(s.min_intensity) > lo_i else None
        lo, hi = (float(v) for v in s.size_range)
        th.min_size_mm = lo if lo > float(s.size_limits[0]) else None
        th.max_size_mm = hi if hi < float(s.size_limits[1]) else None
        self._refresh_gaussians()

    def _set_opacity(self, value) -> None:
        self.scene.set_glyph_opacity(float(value))
        self.ctrl.view_update()

    def _on_click(self, event) -> None:
        pos = (event or {}).get("position") or {}
        if "x" not in pos:
            return
        index = self.scene.pick(pos["x"], pos["y"])
        if index is not None:
            self.state.pick_index = index
            self._show(index)

    def show_index(self, value) -> None:
        try:
            self._show(int(value))
        except (TypeError, ValueError):
            pass

    def _show(self, index: int) -> None:
        try:
            info = self.session.gaussian_info(index)
        except IndexError as exc:
            self.state.picked = str(exc)
            return
        c, sg = info["centre_ras_mm"], info["sigmas_mm"]
        self.state.picked = (f"Gaussian {info['index']}\n"
                             f"centre (RAS mm)  {c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}\n"
                             f"sigmas (mm)      {sg[0]:.2f}, {sg[1]:.2f}, {sg[2]:.2f}\n"
                             f"intensity        {info['intensity']:.4f}\n"
                             + "\n".join(f"axis {k + 1}          {a[0]:+.2f}, {a[1]:+.2f}, {a[2]:+.2f}"
                                         for k, a in enumerate(info["axes"])))

    def export(self, kind: str) -> None:
        s = self.state
        try:
            path = self.session.export(kind, s.export_dir)
            s.export_message = f"wrote {path}"
        except Exception as exc:
            s.export_message = ""
            s.error = f"Export failed: {error_text(exc)}"

    # ------------------------------------------------------------------ refresh
    def _refresh_all(self, reset_camera: bool) -> None:
        s, sess = self.state, self.session
        s.source_label = f"{sess.kind}: {sess.source}"
        r = sess.ranges()
        s.intensity_range, s.min_intensity = list(r["intensity"]), r["intensity"][0]
        s.size_limits, s.size_range = list(r["size"]), list(r["size"])
        s.picked, s.pick_index = "", None
        lp = sess.last_prediction
        s.status = (f"grid {sess.prepared.shape}" + (f"; predicted with {Path(lp.weights).name}, mask ratio "
                                                      f"{lp.mask_ratio:g}, {lp.windows} windows" if lp else ""))
        self.scene.set_volume(sess.prepared.volume.numpy(), sess.prepared.ijk_to_ras)
        self._refresh_gaussians(reset_camera=reset_camera)

    def _refresh_gaussians(self, reset_camera: bool = False) -> None:
        s, sess = self.state, self.session
        poly, keep = sess.glyph_polydata()
        r = sess.ranges()["intensity"]
        self.scene.set_glyphs(poly, keep, scalar_range=r)
        s.n_gaussians = 0 if sess.gaussians is None else len(sess.gaussians)
        s.n_visible = int(len(keep))
        for p in PLANES:
            self._update_slice(p)
        if reset_camera:
            self.scene.reset_camera()
        self.ctrl.view_update()

    def _update_slice(self, plane: str) -> None:
        if not self.session.loaded:
            return
        png = self.session.slice_png(plane, float(self.state[f"{plane}_pos"]))
        self.state[f"{plane}_src"] = "data:image/png;base64," + base64.b64encode(png).decode()

    # ------------------------------------------------------------------ serving
    def serve(self, *, host: str = "127.0.0.1", port: int = 0, on_ready=None) -> None:
        """Serve until interrupted (Ctrl-C / SIGTERM). ``on_ready(url)`` once the port is bound."""

        def ready(**_):
            url = f"http://{host}:{self.server.port}/"
            if on_ready is not None:
                on_ready(url)

        self.ctrl.on_server_ready.add(ready)
        argv, sys.argv = sys.argv, sys.argv[:1]  # trame parses sys.argv for its own options: give it none
        try:
            self.server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0,
                              disable_logging=True)
        finally:
            sys.argv = argv
