"""The Road SSLKD dock panel: data, training options, a live run view and the results of a run.

The dock only arranges things: layer logic is in core.layers, the subprocess in core.runner, the backend
search and set-up in core.backend, remembered values in core.settings.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Optional

from qgis.core import QgsProject, QgsRasterLayer
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsDoubleSpinBox, QgsFileWidget
from qgis.PyQt.QtCore import QSize, Qt, QTimer, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QBrush, QColor, QDesktopServices, QFont, QFontDatabase, QTextCursor, QTextOption
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..compat import QAction
from ..core import settings
from ..core.backend import (
    CANCELLED,
    SOURCE_NAMES,
    BackendInstaller,
    BackendLocator,
    BackendStatus,
    backend_source_dir,
    base_python_candidates,
    has_nvidia_gpu,
    managed_venv_dir,
    plugin_version,
)
from ..core.layers import (
    Pair,
    RunPlan,
    WebExtent,
    check_plan,
    default_output_folder,
    default_run_name,
    describe,
    free_run_name,
    image_layers,
    needs_export,
    to_request,
    width_units,
)
from ..core.protocol import (
    DEVICES,
    PRESETS,
    TRAIN_STAGES,
    RunOutcome,
    format_duration,
    format_eta,
    resume_args,
    stage_label,
)
from ..core.results import (
    COLUMNS,
    RunFolder,
    comparison,
    fmt_params,
    fmt_percent,
    fmt_speed,
    model_label,
    read_metrics,
    report_for_panel,
    result_rows,
)
from ..core.runner import TrainingRunner
from .chart import TrainingChart
from .widgets import ACCENT, Banner, LayerChecklist, PairsEditor, StageStrip, muted, muted_colour, theme_icon

PRESET_HELP = {
    "tiny": "Tiny networks and a few steps: checks the whole pipeline in minutes on any CPU.",
    "cpu": "Small networks sized for a laptop: about an hour on two cores (measured: 59 minutes).",
    "gpu": "The paper's teachers (DeepLabV3+ ResNet-101, VGG-16 encoder-decoder): needs a CUDA GPU.",
}
TAB_DATA, TAB_TRAINING, TAB_RUN, TAB_RESULTS = range(4)


def absolute_folder(folder: str) -> str:
    """A typed relative folder is relative to the project's folder (else the home folder), as QGIS paths are."""
    folder = os.path.expanduser(folder)
    base = QgsProject.instance().absolutePath() or os.path.expanduser("~")
    return os.path.normpath(os.path.join(base, folder))


def _section(title: str, hint: str = "", parent: Optional[QWidget] = None) -> tuple[QGroupBox, QVBoxLayout]:
    box = QGroupBox(title, parent)
    layout = QVBoxLayout(box)
    layout.setSpacing(5)
    if hint:
        label = QLabel(hint, box)
        label.setWordWrap(True)
        muted(label)
        layout.addWidget(label)
    return box, layout


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(widget)
    return area


class SetupDialog(QDialog):
    """Consent for "Set up backend": says what is installed where, and takes the few choices there are."""

    def __init__(self, venv_dir: Path, source_dir: Path, base_python: str, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Set up the Road SSLKD backend")
        layout = QVBoxLayout(self)
        text = QLabel(
            "<p>Training runs with PyTorch in a Python environment of its own, so QGIS's Python is never "
            "touched. Setting it up will:</p><ul>"
            f"<li>create a virtual environment in <code>{venv_dir}</code></li>"
            f"<li>install the backend from <code>{source_dir}</code> with pip, downloading PyTorch and the "
            "other dependencies (about 2 to 3 GB; needs internet access, or a proxy or pip mirror given in "
            "Extra pip arguments below)</li></ul>"
            "<p>Nothing else on your computer changes; deleting that folder removes it all.</p>",
            self,
        )
        text.setWordWrap(True)
        text.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(text)
        form = QFormLayout()
        self.gpu = QCheckBox("NVIDIA GPU (CUDA build of ONNX Runtime)", self)
        self.gpu.setChecked(has_nvidia_gpu())
        form.addRow("Accelerator", self.gpu)
        self.python = QLineEdit(base_python, self)
        form.addRow("Python", self.python)
        self.pip_args = QLineEdit(str(settings.user_value(settings.PIP_ARGS_KEY, "") or ""), self)
        self.pip_args.setPlaceholderText("e.g. --index-url https://my.mirror/simple")
        form.addRow("Extra pip arguments", self.pip_args)
        layout.addLayout(form)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, parent=self
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Install")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)


class RoadSSLKDDock(QgsDockWidget):
    """Train a teacher/student pair from the project's layers and pick the student for segmentation."""

    model_selected = pyqtSignal(str)

    def __init__(
        self,
        iface: Any = None,
        locator: Optional[BackendLocator] = None,
        parent: Optional[QWidget] = None,
    ) -> None:
        super().__init__("Road SSLKD", parent)
        self.setObjectName("RoadSSLKDDock")
        self.iface = iface
        self.locator = locator or BackendLocator()
        self.backend = BackendStatus()
        self.runner = TrainingRunner(self)
        self.runner.backend_event.connect(self.on_event)
        self.runner.log.connect(self.log_line)
        self.runner.finished.connect(self.on_finished)
        self.installer: Optional[BackendInstaller] = None
        self.run_dir: Optional[str] = None
        self.last_outcome: Optional[RunOutcome] = None
        self._restoring = False
        self._loading = False
        self._taken: dict[str, str] = {}
        self._started: Optional[float] = None
        self._run_left_project = False  # another project was opened (or a new one begun) during the run
        self._shown_model: Optional[str] = None  # the ONNX student of the run the Results tab shows
        self._save_timer = QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.setInterval(400)
        self._save_timer.timeout.connect(self.save_settings)
        self._build()
        self._connect_project(True)
        self.restore_settings()
        self.refresh_backend()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        root = QWidget(self)
        layout = QVBoxLayout(root)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(6)

        self.backend_banner = Banner(root)
        self.setup_button = self.backend_banner.add_button("Set up backend", self.set_up_backend, "/mActionAdd.svg")
        self.setup_button.setToolTip("Create a Python environment for training and install the backend into it")
        self.choose_button = self.backend_banner.add_button("Choose…", self.choose_interpreter, "/mActionFileOpen.svg")
        self.choose_button.setToolTip("Use an existing Python interpreter that has road-sslkd installed")
        self.recheck_button = self.backend_banner.add_button("", self.refresh_backend, "/mActionRefresh.svg")
        self.recheck_button.setToolTip("Look for the backend again")
        self.setup_progress = QProgressBar(self.backend_banner)
        self.setup_progress.setRange(0, 0)
        self.setup_progress.setTextVisible(False)
        self.setup_progress.setMaximumHeight(8)
        self.setup_progress.hide()
        self.backend_banner.grid.addWidget(self.setup_progress, 2, 0)
        layout.addWidget(self.backend_banner)

        self.tabs = QTabWidget(root)
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(_scrolled(self._build_data_tab()), theme_icon("/mIconRasterLayer.svg"), "Data")
        self.tabs.addTab(_scrolled(self._build_training_tab()), theme_icon("/mActionOptions.svg"), "Training")
        self.tabs.addTab(self._build_run_tab(), theme_icon("/mTaskRunning.svg"), "Run")
        self.tabs.addTab(self._build_results_tab(), theme_icon("/mIconSuccess.svg"), "Results")
        layout.addWidget(self.tabs, 1)

        self.notice = Banner(root)
        self.notice.hide()
        layout.addWidget(self.notice)

        footer = QHBoxLayout()
        self.start_button = QPushButton(theme_icon("/mActionStart.svg"), "Start training", root)
        self.start_button.setDefault(True)
        self.start_button.setMinimumHeight(30)
        self.start_button.setStyleSheet(
            f"QPushButton {{ background: {ACCENT}; color: white; border-radius: 4px; padding: 4px 14px;"
            " font-weight: bold; } QPushButton:disabled { background: palette(mid); }"
        )
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton(theme_icon("/mTaskCancel.svg"), "Cancel", root)
        self.cancel_button.setMinimumHeight(30)
        self.cancel_button.setToolTip("Stop the training; Resume continues it later from its last checkpoint")
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button = QPushButton(theme_icon("/mActionReload.svg"), "Resume", root)
        self.resume_button.setMinimumHeight(30)
        self.resume_button.setToolTip("Continue the cancelled run from its last checkpoint")
        self.resume_button.clicked.connect(self.resume)
        footer.addWidget(self.start_button, 1)
        footer.addWidget(self.resume_button)
        footer.addWidget(self.cancel_button)
        layout.addLayout(footer)
        self.setWidget(root)
        self.setMinimumWidth(340)
        self._set_running(False)

    def add_segment_action(self, action: QAction) -> None:
        """The plugin's "Segment visible extent" action as a button next to "Use this model"."""
        button = QToolButton(self)
        button.setDefaultAction(action)
        button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonIconOnly)
        button.setObjectName("RoadSSLKDSegmentButton")
        self.segment_button = button
        self.result_buttons.insertWidget(1, button)

    def _build_data_tab(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(2, 6, 2, 2)

        box, inner = _section(
            "Labelled data",
            "Each image with its road labels: a raster mask (road > 0) or a line/polygon layer.",
            page,
        )
        self.labelled = PairsEditor("Add labelled pair", box)
        self.labelled.changed.connect(self._inputs_changed)
        inner.addWidget(self.labelled)
        width_row = QHBoxLayout()
        self.width_label = QLabel("Road width for vector labels", box)
        self.label_width = QgsDoubleSpinBox(box)
        self.label_width.setRange(0.0, 10000.0)
        self.label_width.setDecimals(2)
        self.label_width.setValue(6.0)
        self.label_width.setClearValue(6.0)
        self.label_width.setToolTip(
            "Lines are buffered to this full width, in the image CRS's map units when it is projected (usually "
            "metres) and in metres when it is geographic; a width_m or width field of the layer overrides it")
        self.label_width.valueChanged.connect(self._schedule_save)
        self.width_label.setBuddy(self.label_width)
        width_row.addWidget(self.width_label, 1)
        width_row.addWidget(self.label_width)
        inner.addLayout(width_row)
        self.pair_notes = QLabel(box)
        self.pair_notes.setWordWrap(True)
        muted(self.pair_notes, 0.9)
        inner.addWidget(self.pair_notes)
        layout.addWidget(box)

        box, inner = _section(
            "Unlabelled images",
            "Imagery without labels: the teachers learn from it semi-supervised and teach the student.",
            page,
        )
        self.unlabelled = LayerChecklist(box)
        self.unlabelled.changed.connect(self._inputs_changed)
        inner.addWidget(self.unlabelled)
        row = QHBoxLayout()
        self.all_button, self.none_button = QToolButton(box), QToolButton(box)
        for button, text, checked, tip in (
            (self.all_button, "All", True,
             "Tick the rasters with as many bands as the first labelled image (all rasters when there is none); "
             "untick the others"),
            (self.none_button, "None", False, "Untick every unlabelled image"),
        ):
            button.setText(text)
            button.setToolTip(tip)
            button.setAutoRaise(True)
            button.clicked.connect(lambda _=False, c=checked: self.select_unlabelled(c))
            row.addWidget(button)
        row.addStretch(1)
        self.unlabelled_count = QLabel(box)
        muted(self.unlabelled_count)
        row.addWidget(self.unlabelled_count)
        inner.addLayout(row)
        layout.addWidget(box)

        self.test_box = QgsCollapsibleGroupBox("Test data (optional)", page)
        test_layout = QVBoxLayout(self.test_box)
        hint = QLabel("Held-out pairs the results table is measured on.", self.test_box)
        hint.setWordWrap(True)
        muted(hint)
        test_layout.addWidget(hint)
        self.test_pairs = PairsEditor("Add test pair", self.test_box)
        self.test_pairs.changed.connect(self._inputs_changed)
        test_layout.addWidget(self.test_pairs)
        self.test_box.setCollapsed(True)
        layout.addWidget(self.test_box)
        layout.addStretch(1)
        return page

    def _build_training_tab(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(2, 6, 2, 2)
        box, inner = _section("Training", "", page)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.preset = QComboBox(box)
        for name in PRESETS:
            self.preset.addItem(name, name)
        self.preset.currentIndexChanged.connect(self._preset_changed)
        form.addRow("Preset", self.preset)
        self.preset_help = QLabel(box)
        self.preset_help.setWordWrap(True)
        muted(self.preset_help)
        form.addRow("", self.preset_help)
        self.steps_scale = QDoubleSpinBox(box)
        self.steps_scale.setRange(0.05, 20.0)
        self.steps_scale.setSingleStep(0.25)
        self.steps_scale.setDecimals(2)
        self.steps_scale.setValue(1.0)
        self.steps_scale.setPrefix("× ")
        self.steps_scale.setToolTip("Multiplies the preset's training steps: 0.5 is half as long, 2 twice")
        self.steps_scale.valueChanged.connect(self._schedule_save)
        form.addRow("Training length", self.steps_scale)
        self.output_folder = QgsFileWidget(box)
        self.output_folder.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_folder.setDialogTitle("Folder for training runs")
        self.output_folder.setToolTip(
            "Each run gets a folder in here (empty: the folder shown in grey); a relative folder is taken from "
            "the project's folder")
        self.output_folder.fileChanged.connect(self._schedule_save)
        form.addRow("Output folder", self.output_folder)
        self.run_name = QLineEdit(box)
        self.run_name.setClearButtonEnabled(True)
        self.run_name.setToolTip(
            "The run's folder in the output folder (empty: run-date-time). Start refuses a folder that already "
            "holds files")
        self.run_name.textChanged.connect(self._schedule_save)
        form.addRow("Run name", self.run_name)
        inner.addLayout(form)
        layout.addWidget(box)

        self.advanced = QgsCollapsibleGroupBox("Advanced", page)
        form = QFormLayout(self.advanced)
        self.device = QComboBox(self.advanced)
        for name in DEVICES:
            self.device.addItem(name, name)
        self.device.currentIndexChanged.connect(self._schedule_save)
        self.device.setToolTip("Where the backend trains: auto takes a CUDA GPU when PyTorch sees one, else the CPU")
        form.addRow("Device", self.device)
        self.seed = QSpinBox(self.advanced)
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setSpecialValueText("backend default")
        self.seed.setValue(-1)
        self.seed.setToolTip(
            "Random seed: the same seed, data and settings repeat a run. backend default: the config file's "
            "seed, else 0")
        self.seed.valueChanged.connect(self._schedule_save)
        form.addRow("Seed", self.seed)
        self.config_file = QgsFileWidget(self.advanced)
        self.config_file.setFilter("JSON (*.json)")
        self.config_file.setDialogTitle("Backend configuration (JSON)")
        self.config_file.setToolTip(
            "A JSON object of backend settings (e.g. {\"lr\": 0.0003}): it overrides the preset; the options "
            "here override it")
        self.config_file.fileChanged.connect(self._schedule_save)
        form.addRow("Config file", self.config_file)
        self.baselines = QCheckBox("Baseline students too", self.advanced)
        self.baselines.setToolTip(
            "Supervised, classic semi-supervised and KD students on the same data: the results table then "
            "shows what SSLKD gains (takes longer)"
        )
        self.baselines.toggled.connect(self._schedule_save)
        form.addRow("Compare", self.baselines)
        self.weights = QComboBox(self.advanced)
        self.weights.setEditable(True)
        for text, data in (("backend default", ""), ("imagenet", "imagenet"), ("none", "none"),
                           ("pretrain on these layers", "pretrain")):
            self.weights.addItem(text, data)
        self.weights.setToolTip(
            "Encoder weights: imagenet (downloaded, or from the local cache), none, pretrain on these layers "
            "(self-supervised, on the labelled and unlabelled layers: better than none where imagenet cannot "
            "be downloaded, and longer), a local file, or a folder with one file per encoder (resnet34.pth, "
            "mobilenet_v2.pth...)")
        self.weights.currentTextChanged.connect(self._schedule_save)
        form.addRow("Encoder weights", self.weights)
        self.bands = QLineEdit(self.advanced)
        self.bands.setPlaceholderText("1,2,3 (or e.g. 4,3,2, or 1 for one band)")
        self.bands.setToolTip("The image bands training reads, by number from 1. Empty: 1,2,3")
        self.bands.textChanged.connect(self._schedule_save)
        form.addRow("Bands", self.bands)
        self.extra_args = QLineEdit(self.advanced)
        self.extra_args.setPlaceholderText("more road-sslkd train options")
        self.extra_args.setToolTip(
            "Added to 'road-sslkd train' as typed (split as a shell would); 'road-sslkd train --help' lists them")
        self.extra_args.textChanged.connect(self._schedule_save)
        form.addRow("Extra options", self.extra_args)
        self.interpreter_label = QLineEdit(self.advanced)  # a long path scrolls inside instead of widening
        self.interpreter_label.setReadOnly(True)
        self.interpreter_label.setFrame(False)
        form.addRow("Backend", self.interpreter_label)
        self.advanced.setCollapsed(True)
        layout.addWidget(self.advanced)
        layout.addStretch(1)
        self._preset_changed()
        return page

    def _build_run_tab(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(2, 6, 2, 2)
        self.stage_strip = StageStrip(page)
        layout.addWidget(self.stage_strip)
        self.progress = QProgressBar(page)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("Not started")
        self.progress.setTextVisible(False)  # text over the bar is unreadable in some styles: a label says it
        self.progress.setMaximumHeight(12)
        layout.addWidget(self.progress)
        status_row = QHBoxLayout()
        self.status_label = QLabel("Not started", page)
        bold = QFont(self.status_label.font())
        bold.setBold(True)
        self.status_label.setFont(bold)
        self.status_label.setWordWrap(True)  # "Cross-model SSL · step 12345 of 20000" must not widen the dock
        self.eta_label = QLabel(page)
        self.eta_label.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        status_row.addWidget(self.status_label, 1)
        status_row.addWidget(self.eta_label)
        layout.addLayout(status_row)
        self.chart = TrainingChart(page)
        layout.addWidget(self.chart, 3)
        self.log = QPlainTextEdit(page)
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        self.log.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)  # long paths have no spaces
        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        mono.setPointSizeF(max(7.0, self.font().pointSizeF() * 0.85))
        self.log.setFont(mono)
        self.log.setPlaceholderText("Backend log")
        layout.addWidget(self.log, 2)
        return page

    def _build_results_tab(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        layout.setContentsMargins(2, 6, 2, 2)
        self.summary = QLabel("No results yet: they appear here when a training finishes.", page)
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.summary)
        self.results_table = QTableWidget(0, len(COLUMNS), page)
        self.results_table.setHorizontalHeaderLabels(COLUMNS)
        self.results_table.verticalHeader().setVisible(False)
        self.results_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.results_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.results_table.setAlternatingRowColors(True)
        self.results_table.setWordWrap(False)
        header = self.results_table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, len(COLUMNS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        self.results_table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._fit_table_height()
        layout.addWidget(self.results_table)
        self.result_buttons = buttons = QHBoxLayout()
        self.use_button = QPushButton(theme_icon("/mIconSuccess.svg"), "Use this model", page)
        self.use_button.setToolTip("Use the student (ONNX) for road segmentation in this project")
        self.use_button.clicked.connect(self.use_model)
        self.report_button = QPushButton(theme_icon("/mActionEditHelpContent.svg"), "Report", page)
        self.report_button.setToolTip("The run's full report (report.md) in a window of its own")
        self.report_button.clicked.connect(self.open_report)
        self.open_folder_button = QPushButton(theme_icon("/mActionFileOpen.svg"), "Folder", page)
        self.open_folder_button.setToolTip("Open the run folder (ONNX model, metrics, report, checkpoints)")
        self.open_folder_button.clicked.connect(self.open_run_folder)
        self.open_run_button = QPushButton("Open run…", page)
        self.open_run_button.setToolTip("Show another run folder here (from Processing, the command line or another "
                                        "machine): its results, or Resume when it did not finish")
        self.open_run_button.clicked.connect(self.choose_run)
        buttons.addWidget(self.use_button, 1)
        layout.addLayout(buttons)
        # A row of their own: next to "Use this model" they made the dock wider than the map can spare.
        run_buttons = QHBoxLayout()
        for button in (self.report_button, self.open_folder_button, self.open_run_button):
            run_buttons.addWidget(button)
        run_buttons.addStretch(1)
        layout.addLayout(run_buttons)
        self.report = QTextBrowser(page)
        self.report.setOpenExternalLinks(True)
        self.report.setPlaceholderText("The run's report")
        small = QFont(self.report.font())
        small.setPointSizeF(max(7.0, small.pointSizeF() * 0.9))
        self.report.setFont(small)
        layout.addWidget(self.report, 3)
        self.report_button.setEnabled(False)
        self.use_button.setEnabled(False)
        self.open_folder_button.setEnabled(False)
        return page

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(420, 720)

    # ------------------------------------------------------------------ project and settings
    def _connect_project(self, connect: bool) -> None:
        project = QgsProject.instance()
        pairs = [
            (project.readProject, self.restore_settings),
            (project.cleared, self.restore_settings),
            (project.layersAdded, self._layers_changed),
            (project.layerLoaded, self._project_loading),
            (project.layersRemoved, self._layers_changed),
            # Any project entry written, "Choose Road Model…" among them: is the shown model still the one in use?
            (project.dirtySet, self._show_model_in_use),
        ]
        for signal, slot in pairs:
            if connect:
                signal.connect(slot)
            else:
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):
                    pass

    def _layers_changed(self, *_args: object) -> None:
        self._refresh_unlabelled(force=True)
        self._inputs_changed()

    def select_unlabelled(self, checked: bool = True) -> None:
        """All / None: "All" ticks the rasters with as many bands as the first labelled image (not masks)."""
        reference = next((p.image for p in self.labelled.pairs() if isinstance(p.image, QgsRasterLayer)), None)

        def same_bands(layer_id: str) -> bool:
            layer = QgsProject.instance().mapLayer(layer_id)
            return reference is None or (layer is not None and layer.bandCount() == reference.bandCount())

        self.unlabelled.set_all(checked, same_bands)

    def _taken_layers(self) -> dict[str, str]:
        """Layers in a pair, which the unlabelled list shows but does not offer."""
        taken: dict[str, str] = {}
        for what, editor in (("labelled", self.labelled), ("test", self.test_pairs)):
            for pair in editor.pairs():
                if pair.label is not None:
                    taken[pair.label.id()] = f"labels of a {what} pair"
                if pair.image is not None:
                    taken[pair.image.id()] = f"image of a {what} pair"
        return taken

    def _refresh_unlabelled(self, checked: Optional[set[str]] = None, force: bool = False) -> None:
        taken = self._taken_layers()
        if not force and checked is None and taken == self._taken:
            return
        self._taken = taken
        self.unlabelled.refresh(image_layers(), checked, taken)

    def _project_loading(self, *_args: object) -> None:
        # Layers arrive (and the event loop may run) before readProject restores the dock: a save in
        # between would write the blank dock over the project's training setup.
        self._loading = True
        self._save_timer.stop()

    def _schedule_save(self, *_args: object) -> None:
        if not (self._restoring or self._loading):
            self._save_timer.start()

    def _preset_changed(self, *_args: object) -> None:
        self.preset_help.setText(PRESET_HELP.get(self.preset.currentData(), ""))
        self._schedule_save()

    def _inputs_changed(self, *_args: object) -> None:
        self._refresh_unlabelled()
        plan = self.current_plan()
        self.width_label.setEnabled(plan.has_vector_labels())
        self.label_width.setEnabled(plan.has_vector_labels())
        units = width_units(plan)
        self.label_width.setSuffix(f" {units}" if units else "")
        notes = []
        for pair in plan.labelled:
            for layer in (pair.image, pair.label):
                if layer is not None and describe(layer).export:
                    notes.append(f"'{layer.name()}': {describe(layer).note()}.")
        self.pair_notes.setText("\n".join(dict.fromkeys(notes)))
        self.pair_notes.setVisible(bool(notes))
        total = sum(
            1
            for i in range(self.unlabelled.count())
            if self.unlabelled.item(i).flags() & Qt.ItemFlag.ItemIsUserCheckable
        )
        self.unlabelled_count.setText(f"{len(self.unlabelled.checked_ids())} of {total} selected")
        if self.notice.isVisible() and self.notice.level == "error" and not self.runner.is_running():
            self.notice.hide()  # the user is fixing things; Start checks again
        self._schedule_save()

    def save_settings(self) -> None:
        """Write the dock's values to the project (and defaults for new projects to the user's settings)."""
        if self._restoring or self._loading:
            return

        def pair_ids(pairs: list[Pair]) -> list[dict[str, str]]:
            return [{"image": p.image.id() if p.image else "", "label": p.label.id() if p.label else ""} for p in pairs]

        settings.set_project_json("labelled", pair_ids(self.labelled.pairs()))
        settings.set_project_json("test", pair_ids(self.test_pairs.pairs()))
        settings.set_project_json("unlabelled", sorted(self.unlabelled.checked_ids()))
        settings.set_project_value("label_width", self.label_width.value())
        settings.set_project_value("preset", self.preset.currentData())
        settings.set_project_value("steps_scale", self.steps_scale.value())
        settings.set_project_value("device", self.device.currentData())
        settings.set_project_value("seed", self.seed.value())
        settings.set_project_value("config_file", self.config_file.filePath())
        settings.set_project_value("extra_args", self.extra_args.text())
        settings.set_project_value("baselines", int(self.baselines.isChecked()))
        settings.set_project_value("weights", self._weights_value())
        settings.set_project_value("bands", self.bands.text())
        settings.set_project_value("output_folder", self.output_folder.filePath())
        settings.set_project_value("run_name", self.run_name.text())
        settings.set_user_value("defaults/preset", self.preset.currentData())
        settings.set_user_value("defaults/device", self.device.currentData())
        settings.set_user_value("defaults/steps_scale", self.steps_scale.value())
        if self.output_folder.filePath():
            settings.set_user_value("output_folder", self.output_folder.filePath())

    def restore_settings(self, *_args: object) -> None:
        """Fill the dock from the current project's entries (user defaults where the project has none)."""
        project = QgsProject.instance()
        running = self.runner.is_running()
        self._run_left_project |= running
        self._loading = False  # cleared (before a project's layers load) or readProject (after)
        self._restoring = True
        try:

            def pairs(key: str) -> list[Pair]:
                found = []
                for entry in settings.project_json(key, []):
                    if isinstance(entry, dict):
                        found.append(
                            Pair(
                                project.mapLayer(entry.get("image", "")) or None,
                                project.mapLayer(entry.get("label", "")) or None,
                            )
                        )
                return found

            labelled = pairs("labelled") or [Pair()]
            self.labelled.set_pairs(labelled)
            test = pairs("test")
            self.test_pairs.set_pairs(test)
            self.test_box.setCollapsed(not test)
            self._refresh_unlabelled(set(settings.project_json("unlabelled", [])), force=True)
            self.label_width.setValue(_float(settings.project_value("label_width"), 6.0))
            preset = settings.project_value("preset") or str(settings.user_value("defaults/preset", "tiny"))
            self.preset.setCurrentIndex(max(0, self.preset.findData(preset)))
            self.steps_scale.setValue(
                _float(
                    settings.project_value("steps_scale"),
                    _float(settings.user_value("defaults/steps_scale", 1.0), 1.0),
                )
            )
            device = settings.project_value("device") or str(settings.user_value("defaults/device", "auto"))
            self.device.setCurrentIndex(max(0, self.device.findData(device)))
            self.seed.setValue(int(_float(settings.project_value("seed"), -1)))
            self.config_file.setFilePath(settings.project_value("config_file"))
            self.extra_args.setText(settings.project_value("extra_args"))
            self.baselines.setChecked(settings.project_value("baselines") == "1")
            weights = settings.project_value("weights")
            index = self.weights.findData(weights)
            if index >= 0:
                self.weights.setCurrentIndex(index)
            else:
                self.weights.setEditText(weights)
            self.bands.setText(settings.project_value("bands"))
            self.output_folder.setFilePath(settings.project_value("output_folder"))
            self.output_folder.lineEdit().setPlaceholderText(default_output_folder())
            self.run_name.setText(settings.project_value("run_name"))
            self.run_name.setPlaceholderText(f"automatic ({default_run_name()})")
            if not running:  # the dock keeps showing the run in progress, whichever project is open
                self.run_dir = settings.project_value("last_run_dir") or None
        finally:
            self._restoring = False
        self._preset_changed()
        self._inputs_changed()
        self._save_timer.stop()
        if not running:
            self._show_last_run()

    def _show_last_run(self) -> None:
        state = settings.project_value("last_run_state")
        if self.run_dir and RunFolder(self.run_dir).finished():
            self.load_results(self.run_dir)
        else:
            self._clear_results()
        self._update_resume(state)

    def _update_resume(self, state: str) -> None:
        resumable = (
            state in ("cancelled", "running")
            and bool(self.run_dir)
            and os.path.isdir(self.run_dir or "")
            and not RunFolder(self.run_dir or "").finished()  # "running" is left when a run ends elsewhere
            and not self.runner.is_running()
        )
        self.resume_button.setVisible(resumable)

    # ------------------------------------------------------------------ backend
    def refresh_backend(self) -> None:
        """Search the backend again and show the result in the banner."""
        self.backend = self.locator.find()
        self._show_backend()

    def _show_backend(self) -> None:
        installing = self.installer is not None and self.installer.is_running()
        self.setup_progress.setVisible(installing)
        for button in (self.setup_button, self.choose_button, self.recheck_button):
            button.setEnabled(not installing)
        if installing:
            return
        status = self.backend
        if status.found:
            mine = plugin_version()
            where = SOURCE_NAMES.get(status.source, status.source)
            self.interpreter_label.setText(f"{status.python}")
            self.interpreter_label.setCursorPosition(0)
            if mine and status.version and mine != status.version:
                self.backend_banner.show_message(
                    f"Backend {status.version} ({where}) differs from the plugin's {mine}: "
                    "<b>Set up backend</b> updates it.",
                    "warning",
                )
                self.setup_button.setText("Update backend")
                self.setup_button.setVisible(True)
                self.choose_button.setVisible(False)
                self.recheck_button.setVisible(False)
            else:
                self.backend_banner.show_message(f"Backend {status.version} ready · {where}", "ok")
                for button in (self.setup_button, self.choose_button, self.recheck_button):
                    button.setVisible(False)
            self.backend_banner.setToolTip(status.python or "")
            return
        notes = "".join(f"<br><small>{_escape(n)}</small>" for n in status.notes)
        self.backend_banner.show_message(
            "<b>No training backend found.</b> Training runs with PyTorch in a Python environment of its "
            f"own: set it up once, or choose an interpreter that has <code>road-sslkd</code>.{notes}",
            "warning",
        )
        self.interpreter_label.setText("not found")
        self.setup_button.setText("Set up backend")
        for button in (self.setup_button, self.choose_button, self.recheck_button):
            button.setVisible(True)

    def choose_interpreter(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Python interpreter of the backend venv")
        if path:
            settings.set_user_value(settings.BACKEND_PYTHON_KEY, path)
            self.refresh_backend()

    def set_up_backend(self) -> None:
        """Ask for consent, then create the managed venv and pip-install the backend into it."""
        source = backend_source_dir(self.locator.plugin_dir)
        if source is None:
            self.show_problems(
                [
                    "This copy of the plugin has no backend source (backend/pyproject.toml): "
                    "install road-sslkd yourself and choose its interpreter."
                ]
            )
            return
        bases = base_python_candidates()
        if not bases:
            self.show_problems(
                [
                    "No Python interpreter found to create the backend's environment: install "
                    "Python 3.9 or newer, or set road_sslkd/backend/base_python."
                ]
            )
            return
        dialog = SetupDialog(self.locator.profile_venv, source, bases[0], self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        settings.set_user_value(settings.PIP_ARGS_KEY, dialog.pip_args.text().strip())
        self.start_backend_setup(
            self.locator.profile_venv,
            source,
            dialog.python.text().strip(),
            dialog.gpu.isChecked(),
            shlex.split(dialog.pip_args.text()),
        )

    def start_backend_setup(
        self,
        venv_dir: Optional[Path] = None,
        source_dir: Optional[Path] = None,
        base_python: Optional[str] = None,
        gpu: bool = False,
        pip_args: Optional[list[str]] = None,
    ) -> None:
        """Run the set-up without asking (the consent dialog calls this; so do tests); nothing while one runs."""
        if self.installer is not None and self.installer.is_running():
            return
        source = source_dir or backend_source_dir(self.locator.plugin_dir)
        base = base_python or (base_python_candidates() or [""])[0]
        self.installer = BackendInstaller(venv_dir or managed_venv_dir(), source, base, gpu, pip_args, self)
        self.installer.step.connect(
            lambda text: self.backend_banner.show_message(f"<b>Setting up the backend…</b><br>{_escape(text)}", "info")
        )
        self.installer.log.connect(lambda line: self.log_line(line, "info"))
        self.installer.finished.connect(self._setup_finished)
        self.notice.hide()
        self.tabs.setCurrentIndex(TAB_RUN)
        self.installer.start()
        self._show_backend()

    def _setup_finished(self, ok: bool, message: str) -> None:
        self.log_line(message, "info" if ok or message == CANCELLED else "error")
        self.setup_progress.hide()
        if ok:
            self.notify(message)
        elif message == CANCELLED:  # the user's choice, not a failure
            self.notice.show_message(_escape(message), "info")
        else:
            summary, *output = message.splitlines() or [""]
            tail = "\n".join(output[-15:])
            self.notice.show_message(
                f"<b>Setting up the backend failed.</b> {_escape(summary)} (full log in the Run tab)"
                f"<pre style='white-space: pre-wrap'>{_escape(tail)}</pre>",
                "error",
            )
        self.installer = None
        self.refresh_backend()

    # ------------------------------------------------------------------ running
    def current_plan(self) -> RunPlan:
        """The user's choices as they are now (layers, not yet paths)."""
        seed = self.seed.value()
        return RunPlan(
            labelled=self.labelled.pairs(),
            unlabelled=self.unlabelled.checked_layers(),
            test=self.test_pairs.pairs(),
            output_folder=absolute_folder(self.output_folder.filePath().strip() or default_output_folder()),
            run_name=self.run_name.text().strip(),
            label_width=self.label_width.value(),
            preset=self.preset.currentData(),
            steps_scale=self.steps_scale.value(),
            device=self.device.currentData(),
            seed=None if seed < 0 else seed,
            config=self.config_file.filePath().strip(),
            stages=list(TRAIN_STAGES) if self.baselines.isChecked() else [],
            weights=self._weights_value(),
            bands=self.bands.text().strip(),
            extra_args=shlex.split(self.extra_args.text()) if self.extra_args.text().strip() else [],
        )

    def _weights_value(self) -> str:
        text = self.weights.currentText().strip()
        index = self.weights.findText(text)
        return str(self.weights.itemData(index) or "") if index >= 0 else text

    def check(self, plan: RunPlan) -> list[str]:
        """Problems that stop a start: the plan's, a missing backend, a run already going."""
        problems = []
        if self.runner.is_running():
            problems.append("A training is already running.")
        if not self.backend.found:
            problems.append("No training backend: click 'Set up backend' above, or choose an interpreter.")
        return problems + check_plan(plan)

    def notify(self, text: str) -> None:
        """A short success message in QGIS's message bar (where there is one)."""
        bar = getattr(self.iface, "messageBar", None) if self.iface is not None else None
        try:
            bar().pushSuccess("Road SSLKD", text)
        except (TypeError, AttributeError, RuntimeError):
            pass  # no QGIS main window (tests, standalone use): the dock itself shows the state

    def show_problems(self, problems: list[str], level: str = "error") -> None:
        items = "".join(f"<li>{_escape(p)}</li>" for p in problems)
        title = "Before training can start:" if level == "error" else ""
        self.notice.show_message(f"<b>{title}</b><ul style='margin: 2px 0 0 -20px'>{items}</ul>", level)

    def start(self) -> bool:
        """Check everything, export non-file layers, then start the backend. False when it did not start."""
        plan = self.current_plan()
        if not plan.run_name and not self.runner.is_running():
            plan.run_name = free_run_name(plan.output_folder, default_run_name())
        problems = self.check(plan)
        if problems:
            self.show_problems(problems)
            return False
        self.notice.hide()
        self.save_settings()
        try:
            os.makedirs(plan.output_folder, exist_ok=True)
            if needs_export(plan):
                self.log_line("Exporting layers that have no file…", "info")
                QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
            try:
                request = to_request(plan, plan.run_dir + ".inputs", self._web_extent())
            finally:
                if QApplication.overrideCursor() is not None:
                    QApplication.restoreOverrideCursor()
        except (OSError, RuntimeError) as exc:
            self.show_problems([str(exc)])
            return False
        self._start_process(request.to_args(), plan.run_dir, fresh=True, stages=plan.stages)
        return True

    def resume(self) -> bool:
        """Continue the cancelled run of this project from its checkpoint."""
        if not self.run_dir or self.runner.is_running():
            return False
        if not self.backend.found:
            self.show_problems(["No training backend: click 'Set up backend' above."])
            return False
        self.notice.hide()
        self._start_process(resume_args(self.run_dir), self.run_dir, fresh=False)
        return True

    def cancel(self) -> None:
        if self.installer is not None and self.installer.is_running():
            self.installer.cancel()
            return
        self.status_label.setText("Stopping: writing a checkpoint…")
        self.runner.cancel()

    def _start_process(self, args: list[str], run_dir: str, fresh: bool, stages: Optional[list[str]] = None) -> None:
        self.run_dir = run_dir
        self._run_left_project = False
        self._started = time.monotonic()
        if fresh:
            self.chart.clear()
            self.log.clear()
        self.stage_strip.reset(stages)
        self.progress.setRange(0, 0)
        self.progress.setFormat("Starting…")
        self.status_label.setText("Starting the backend…")
        self.eta_label.clear()
        self._clear_results()
        settings.set_project_value("last_run_dir", run_dir)
        settings.set_project_value("last_run_state", "running")
        self.tabs.setCurrentIndex(TAB_RUN)
        self.runner.start(self.backend.command(), args, run_dir, f"Road SSLKD: {os.path.basename(run_dir)}")
        self._set_running(True)

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.cancel_button.setVisible(running)
        self.cancel_button.setEnabled(running)
        if running:
            self.resume_button.setVisible(False)

    def _web_extent(self) -> Optional[WebExtent]:
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        try:
            return WebExtent(canvas.extent(), canvas.mapSettings().destinationCrs(), canvas.width())
        except (AttributeError, TypeError, RuntimeError):
            return None

    def on_event(self, event: dict[str, Any]) -> None:
        """One backend event: progress, metric, artifact, warning, error or done."""
        kind = event.get("event")
        if kind == "progress":
            self._on_progress(event)
        elif kind == "metric":
            name = str(event.get("name") or "")
            value = event.get("value")
            if not isinstance(value, (int, float)):
                return
            if event.get("step") is None:  # a final number of a model (test IoU, speed), not a curve point
                model = model_label(str(event.get("stage") or ""))
                if name.startswith("mpx_per_s"):  # ONNX throughput (fp32 and INT8), the others are fractions
                    shown = f"{value:.2f} Mpx/s"
                elif name == "threshold":
                    shown = f"{value:.3f}"
                else:
                    shown = f"{100 * value:.1f} %"
                self.log_line(f"{model}: {name.replace('_', ' ')} = {shown}", "metric")
                return
            self.chart.add_metric(name, float(value), event.get("stage"), event.get("step"))
            if name.endswith("iou"):
                self.log_line(f"{stage_label(event.get('stage'))}: {name} = {100 * value:.1f} %", "metric")
        elif kind == "artifact":
            self.log_line(f"Wrote {event.get('kind')}: {event.get('path')}", "info")
        elif kind == "warning":
            self.log_line(f"Warning: {event.get('message')}", "warning")
        elif kind == "error":
            hint = f" ({event.get('hint')})" if event.get("hint") else ""
            self.log_line(f"Error: {event.get('message')}{hint}", "error")
        elif kind == "done":
            self.log_line("The backend reports the run as done.", "info")

    def _on_progress(self, event: dict[str, Any]) -> None:
        stage = str(event.get("stage") or "")
        step, total = int(event.get("step") or 0), int(event.get("total") or 0)
        model = event.get("model")
        if stage == "evaluate" and model:
            # Each model is evaluated right after its training stage: a moment within that stage.
            text = f"Evaluating {model_label(str(model))}…"
            self.progress.setRange(0, 0)
        else:
            self.stage_strip.set_current(stage)
            text = stage_label(stage)
            if total > 0:
                self.progress.setRange(0, total)
                self.progress.setValue(min(step, total))
                text += f" · step {step} of {total}"
            else:
                self.progress.setRange(0, 0)
        self.progress.setFormat(text)  # for screen readers; the label shows it
        self.status_label.setText(text)
        self.eta_label.setText(format_eta(event.get("eta")))
        current = self.stage_strip.current
        if current in self.stage_strip.stages:
            number, count = self.stage_strip.stages.index(current) + 1, len(self.stage_strip.stages)
            self.status_label.setToolTip(f"Stage {number} of {count}: {stage_label(current)}")

    def on_finished(self, outcome: RunOutcome) -> None:
        """Show how the run ended: results, a resumable cancel, or the error with the stderr tail."""
        self.last_outcome = outcome
        self._set_running(False)
        state = {"done": "done", "cancelled": "cancelled"}.get(outcome.status, "failed")
        self.stage_strip.finish(outcome.ok)
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if outcome.ok else 0)
        self.progress.setFormat(outcome.message.rstrip("."))
        self.status_label.setText(outcome.message)
        self.eta_label.clear()
        if self._run_left_project:
            self._run_left_project = False
            self._finished_elsewhere(outcome)
            return
        settings.set_project_value("last_run_state", state)
        if outcome.ok:
            self.notice.hide()
            self.load_results(outcome.run_dir or self.run_dir or "")
            self.tabs.setCurrentIndex(TAB_RESULTS)
            took = format_duration(time.monotonic() - self._started) if self._started else ""
            self.notice.show_message(
                f"<b>Training finished{' in ' + took if took else ''}.</b> The student is ready: check the "
                "table, then <b>Use this model</b> for segmentation.",
                "ok",
            )
            self.notify("Training finished: the student is ready.")
        elif outcome.status == "cancelled":
            self.log_line(outcome.message, "warning")
            self.notice.show_message(
                f"<b>{_escape(outcome.message)}</b> {_escape(outcome.hint)} Click <b>Resume</b> to continue.",
                "info",
            )
        else:
            details = outcome.details()
            self.log_line(f"{outcome.message} {outcome.hint}\n{details}".strip(), "error")
            pre = f"<pre style='white-space: pre-wrap'>{_escape(details)}</pre>" if details else ""
            self.notice.show_message(f"<b>{_escape(outcome.message)}</b> {_escape(outcome.hint)}{pre}", "error")
        self._update_resume(state)

    def _finished_elsewhere(self, outcome: RunOutcome) -> None:
        """A run started in another project ended: say where it is, change nothing in this project."""
        folder = outcome.run_dir or ""
        where = f"The run ({folder}) was started in another project; open that project to see its results"
        where += " or resume it." if outcome.status != "done" else "."
        self.log_line(f"{outcome.message} {where}", "warning")
        self.notice.show_message(f"<b>{_escape(outcome.message)}</b> {_escape(where)}", "info")
        self.run_dir = settings.project_value("last_run_dir") or None
        self._show_last_run()

    def log_line(self, text: str, level: str = "info") -> None:
        colours = {"error": "#c53030", "warning": "#b7791f", "command": ACCENT, "metric": "#2f855a"}
        cursor = self.log.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        fmt = cursor.charFormat()
        fmt.setForeground(QBrush(QColor(colours[level])) if level in colours else self.palette().text())
        fmt.setFontWeight(QFont.Weight.Bold if level == "command" else QFont.Weight.Normal)
        if not self.log.document().isEmpty():
            cursor.insertBlock()
        cursor.insertText(text, fmt)
        self.log.verticalScrollBar().setValue(self.log.verticalScrollBar().maximum())

    # ------------------------------------------------------------------ results
    def _clear_results(self) -> None:
        self.results_table.setRowCount(0)
        self.summary.setText("No results yet: they appear here when a training finishes.")
        self.report.clear()
        self.use_button.setEnabled(False)
        self._shown_model = None
        self._show_model_in_use()
        self.report_button.setEnabled(False)
        self.open_folder_button.setEnabled(bool(self.run_dir) and os.path.isdir(self.run_dir or ""))

    def load_results(self, run_dir: str) -> None:
        """Fill the results table, summary and report from a finished run folder."""
        folder = RunFolder(run_dir)
        rows = result_rows(read_metrics(folder.metrics)) if folder.metrics else []
        self.results_table.setRowCount(len(rows))
        bold = QFont(self.font())
        bold.setBold(True)
        highlight = QColor(ACCENT)
        highlight.setAlpha(40)
        for r, row in enumerate(rows):
            for c, text in enumerate(row.cells()):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                if row.is_student:
                    item.setFont(bold)
                    item.setBackground(QBrush(highlight))
                item.setToolTip(row.help)
                self.results_table.setItem(r, c, item)
        self.results_table.resizeRowsToContents()
        self._fit_table_height()
        student = next((row for row in rows if row.is_student), None)
        name = os.path.basename(os.path.normpath(run_dir))
        if student is not None:
            iou, f1 = fmt_percent(student.iou), fmt_percent(student.f1)
            params, speed = fmt_params(student.params), fmt_speed(student.mpx_per_s)
            compared = comparison(rows)
            self.summary.setText(
                f"<span style='font-size: 115%'><b>Student SSLKD</b>: IoU <b>{iou}</b> · F1 {f1}</span><br>"
                f"<span style='color: {muted_colour(self).name()}'>{params} parameters · {speed} · run "
                f"<i>{_escape(name)}</i>{'<br>' + _escape(compared) if compared else ''}</span>"
            )
        else:
            self.summary.setText(f"Run <i>{_escape(name)}</i>: no metrics found.")
        self.report.clear()
        if folder.report:
            _show_markdown(self.report, report_for_panel(_read_text(folder.report)), run_dir)
        self.report_button.setEnabled(folder.report is not None)
        self.use_button.setEnabled(folder.onnx is not None)
        self._shown_model = folder.onnx
        self._show_model_in_use()
        self.open_folder_button.setEnabled(os.path.isdir(run_dir))

    def _fit_table_height(self) -> None:
        """As tall as its rows (at least three), so the report below gets the rest of the panel."""
        table = self.results_table
        rows = max(table.rowCount(), 3)
        row_height = table.verticalHeader().defaultSectionSize()
        if table.rowCount():
            row_height = max(table.rowHeight(r) for r in range(table.rowCount()))
        table.setMaximumHeight(
            table.horizontalHeader().sizeHint().height() + rows * row_height + 2 * table.frameWidth() + 2
        )

    def _show_model_in_use(self) -> None:
        """The use button says whether the shown run's student is the model segmentation uses now."""
        in_use = bool(self._shown_model) and settings.selected_model() == self._shown_model
        self.use_button.setText("In use for segmentation" if in_use else "Use this model")

    def use_model(self) -> None:
        """Make this run's student the model segmentation uses (settings key road_sslkd/model/onnx_path)."""
        onnx = RunFolder(self.run_dir or "").onnx
        if onnx is None:
            return
        settings.set_selected_model(onnx)
        self._show_model_in_use()
        self.notify(f"Segmentation now uses {onnx}")
        self.model_selected.emit(onnx)

    def open_report(self) -> None:
        """The full report.md in a resizable window (the panel is too narrow for its tables)."""
        report = RunFolder(self.run_dir or "").report
        if report is None:
            return
        dialog = QDialog(self)
        dialog.setWindowTitle(f"Road SSLKD report: {os.path.basename(os.path.normpath(self.run_dir or ''))}")
        layout = QVBoxLayout(dialog)
        browser = QTextBrowser(dialog)
        browser.setOpenExternalLinks(True)
        _show_markdown(browser, _read_text(report), self.run_dir or "")
        layout.addWidget(browser)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, parent=dialog)
        buttons.rejected.connect(dialog.reject)
        layout.addWidget(buttons)
        dialog.resize(900, 640)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.show()

    def choose_run(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a Road SSLKD run folder",
                                                  self.run_dir or default_output_folder())
        if folder:
            self.open_run(folder)

    def open_run(self, folder: str) -> bool:
        """Make the run in ``folder`` this project's run: its results when it finished, else Resume."""
        if self.runner.is_running():
            self.show_problems(["A training is running: open another run once it has finished or been cancelled."],
                               "warning")
            return False
        run = RunFolder(os.path.abspath(folder))
        if run.config is None:
            self.show_problems([f"{run.path} is not a Road SSLKD run folder (no config.json): choose the folder a "
                                "training wrote."], "warning")
            return False
        state = "done" if run.finished() else "cancelled"
        if run.path != self.run_dir:  # the Run tab showed another run: a Resume would add to its chart and log
            self.chart.clear()
            self.log.clear()
            self.stage_strip.reset()
            self.progress.setRange(0, 1)
            self.progress.setValue(int(state == "done"))
            self.status_label.setText("Finished" if state == "done" else "Stopped before the end")
            self.progress.setFormat(self.status_label.text())
            self.eta_label.clear()
        self.run_dir = run.path
        settings.set_project_value("last_run_dir", run.path)
        settings.set_project_value("last_run_state", state)
        self.notice.hide()
        if state == "done":
            self.load_results(run.path)
            self.tabs.setCurrentIndex(TAB_RESULTS)
        else:
            self._clear_results()
            self.notice.show_message(f"<b>The run {_escape(os.path.basename(run.path))} did not finish.</b> "
                                     "Resume continues it from its last checkpoint.", "info")
            self.tabs.setCurrentIndex(TAB_RUN)
        self._update_resume(state)
        return True

    def open_run_folder(self) -> None:
        if self.run_dir and os.path.isdir(self.run_dir):
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.run_dir))

    # ------------------------------------------------------------------ teardown
    def shutdown(self) -> None:
        """Stop everything this dock started (plugin unload): no process or signal outlives it."""
        self._save_timer.stop()
        self._connect_project(False)
        if self.installer is not None and self.installer.is_running():
            self.installer.finished.disconnect()
            self.installer.cancel()
        if self.runner.is_running():
            self.runner.finished.disconnect(self.on_finished)
            self.runner.backend_event.disconnect(self.on_event)
            self.runner.log.disconnect(self.log_line)
            self.runner.stop_and_wait()
            if not self._run_left_project:  # else the open project is not the run's: its own keeps "running"
                settings.set_project_value("last_run_state", "cancelled")


def _float(value: object, default: float) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _show_markdown(browser: QTextBrowser, text: str, base_dir: str) -> None:
    browser.setSearchPaths([base_dir])  # relative image links in the report resolve in the run folder
    if hasattr(browser, "setMarkdown"):  # Qt >= 5.14
        browser.setMarkdown(text)
    else:
        browser.setPlainText(text)


def _escape(text: str) -> str:
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
