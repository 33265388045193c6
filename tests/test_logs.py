"""Text logs, the fifth source format: line rules, byte ranges, gzip, counted bad lines, the crawl, training."""

from __future__ import annotations

import gzip
import json
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebm_vae import EnergyMap, demo
from ebm_vae.capsules import CapsuleError, visible_capsules
from ebm_vae.config import compose
from ebm_vae.crawl.crawl import crawl
from ebm_vae.data.extractors import EXTRACTORS
from ebm_vae.data.readers import READERS, ReadError, ReadOptions, sniff_format
from ebm_vae.data.units import WorkUnit, entry_plan, make_units, read_unit
from ebm_vae.export import export
from ebm_vae.train import train

LOG = READERS["log"]
KEY_VALUE = ReadOptions(log_fields=(("f", "f"), ("angle", "angle")))


def write_capsule(conf: Path, name: str, body: str) -> Path:
    path = conf / "capsule" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def crawl_cfg(data: Path, out: Path, conf: Path | None = None, *overrides: str):
    return compose("crawl", [f"data.root={data}", f"paths.root={out}", "crawl.workers=1",
                             "crawl.progress=false", *overrides], extra_dirs=[conf] if conf else None)


def records(path: Path, options: ReadOptions, columns: list[str], start: int = 0,
            stop: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The columns of [start, stop) concatenated, and the lines that range skipped."""
    with LOG.open(path, options) as handle:
        batches = list(handle.iter_batches(columns, start, stop, batch_rows=7))
        out = {c: np.concatenate([b[c] for b in batches]) if batches else np.empty(0) for c in columns}
        return out, handle.skipped_rows


# --------------------------------------------------------------------------- line rules


def test_key_value_lines_parse_without_a_pattern(tmp_path):
    path = tmp_path / "pmu.log"
    path.write_text("2024-05-01T00:00:00.5Z dev7 f=50.012 angle=0.314 status=OK\n"
                    "\n"
                    "   \n"
                    "2024-05-01T00:00:01Z dev7 ANGLE=-0.5, F=49.98; note=x\r\n"  # any order, case, separators
                    "2024-05-01T00:00:02Z dev7 EVENT resync\n"  # no fields: not a record
                    "dev7 f=50.1 angle=n/a\n"  # a value that is not a number
                    "df=1 f=50.2 angle=0.2 xf=9\n"  # `df=`, `xf=` are other keys, not f
                    "f=50.3\n")  # cut short: angle missing
    info = LOG.inspect(path, KEY_VALUE)
    assert (info.format, info.n_rows, info.skipped_rows, info.extent) == ("log", 3, 3, path.stat().st_size)
    assert [v.name for v in info.variables] == ["f", "angle", "timestamp"]
    got, skipped = records(path, KEY_VALUE, ["f", "angle", "timestamp"])
    np.testing.assert_array_equal(got["f"], [50.012, 49.98, 50.2])
    np.testing.assert_array_equal(got["angle"], [0.314, -0.5, 0.2])
    start = 1714521600.0  # 2024-05-01T00:00:00Z
    np.testing.assert_array_equal(got["timestamp"], [start + 0.5, start + 1.0, np.nan])
    assert skipped == 3  # blank lines are not records and not skipped


def test_a_pattern_with_a_timestamp_format(tmp_path):
    path = tmp_path / "shots.txt"
    path.write_text("03/05/2024 14:02:11.25 | shot 1 | Ip=1.5 MA | ne=3.25\n"
                    "03/05/2024 14:02:12 | shot 2 | DISRUPTION\n"
                    "yesterday | shot 3 | Ip=1.25 MA | ne=2.5\n")  # a timestamp that does not parse: NaN
    options = ReadOptions(log_pattern=r"^(?P<timestamp>.+?) \| shot \d+ \| Ip=(?P<ip>\S+) MA \| ne=(?P<ne>\S+)",
                          log_fields=(("ip", "ip"), ("ne", "ne")), timestamp_format="%d/%m/%Y %H:%M:%S.%f")
    got, skipped = records(path, options, ["ip", "ne", "timestamp"])
    np.testing.assert_array_equal(got["ip"], [1.5, 1.25])
    np.testing.assert_array_equal(got["ne"], [3.25, 2.5])
    assert got["timestamp"][0] == 1714744931.25 and np.isnan(got["timestamp"][1])  # 3 May 2024 (day first)
    assert skipped == 1


def test_columns_are_what_the_first_lines_hold(tmp_path):
    """A key the first lines never hold is not a column (the grid extractor then derives the phase)."""
    path = demo.write_pmu_log(tmp_path / "grid_pmu.log", n_rows=50, bad_fraction=0)
    text = path.read_text().replace(" phase_angle=", " other=")
    path.write_text(text)
    grid = EXTRACTORS["grid"](visible_capsules()["grid"])
    info = LOG.inspect(path, grid.read_options)
    assert [v.name for v in info.variables] == ["frequency", "timestamp"]
    plan = grid.plan(info)
    assert plan.whole_file and plan.n_samples == 50
    with grid.open(path, "log") as handle:
        states = np.concatenate(list(grid.iter_states(handle, plan, 0, plan.extent, 16)))
    assert states.shape == (50, 2) and np.isfinite(states).all() and states[0, 1] == 0.0


def test_bad_patterns_are_refused_when_the_capsule_loads(tmp_path):
    base = """\
        name: shots
        match: {name: ["*shot*"]}
        variables: [ip]
        log:
          pattern: '%s'
        """
    for pattern, reason in ((r"(?P<ip>\S+) (\S+)", "unnamed groups"),
                            (r"(?P<ip>a)\1", "invalid escape"),  # a backreference: RE2 has none
                            (r"(?P<ip>a)(?=b)", "invalid perl operator"),  # a lookahead: neither
                            (r"ip=\S+", "no named group"),
                            (r"(?P<iq>\S+)", "group 'iq' is not one of the capsule's variables")):
        conf = tmp_path / str(abs(hash(pattern)))
        write_capsule(conf, "shots", base % pattern)
        with pytest.raises(CapsuleError, match="invalid capsule key 'log.pattern'") as caught:
            visible_capsules([conf])
        assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_catastrophic_pattern_cannot_hang_the_crawl_or_the_stream(tmp_path):
    """(a+)+b backtracks exponentially in Python's `re` on a long line of a's; RE2 has no backtracking."""
    data, conf = tmp_path / "data", tmp_path / "conf"
    write_capsule(conf, "hostile", """\
        name: hostile
        match: {name: ["*hostile*"]}
        variables: [x]
        log:
          pattern: '^(?P<x>[0-9]+) (?:a+)+b$'
        """)
    data.mkdir()
    (data / "hostile.log").write_text("7 aab\n" + ("1 " + "a" * 20_000 + "c\n") * 50 + "8 ab\n")
    started = time.perf_counter()
    manifest = crawl(crawl_cfg(data, tmp_path / "out", conf, "crawl.file_timeout_s=30"))
    (row,) = manifest.entries()
    assert (row.capsule, row.error, row.n_samples, row.skipped_rows) == ("hostile", None, 2, 50)
    capsule = visible_capsules([conf])["hostile"]
    extractor = EXTRACTORS["table"](capsule)
    plan = entry_plan(extractor, row)
    states = np.concatenate(list(read_unit(extractor, data, WorkUnit.whole(row, plan), 64)))
    np.testing.assert_array_equal(states[:, 0], [7, 8])
    assert time.perf_counter() - started < 25  # Python's re would take longer than the universe


# --------------------------------------------------------------------------- byte ranges and gzip


def test_byte_ranges_split_across_lines_read_every_line_once(tmp_path):
    path = demo.write_pmu_log(tmp_path / "grid_pmu.log", n_rows=40, bad_fraction=0.1, seed=3)
    options = EXTRACTORS["grid"](visible_capsules()["grid"]).read_options
    columns = ["frequency", "phase_angle", "timestamp"]
    whole, whole_skipped = records(path, options, columns)
    assert len(whole["frequency"]) == 36 and whole_skipped == 4
    size = path.stat().st_size
    cuts = [0, *range(1, size, 37), size]  # 37 bytes: cuts fall inside lines, at line ends, anywhere
    for step in (1, 2, 5):
        bounds = cuts[::step] if cuts[::step][-1] == size else [*cuts[::step], size]
        parts = [records(path, options, columns, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        for c in columns:
            np.testing.assert_array_equal(np.concatenate([p[0][c] for p in parts]), whole[c])
        assert sum(p[1] for p in parts) == whole_skipped


numbers = st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:.6g}")
record = st.tuples(numbers, numbers, st.sampled_from(["", "dev7 ", "2024-05-01T00:00:00Z "]),
                   st.booleans()).map(lambda t: f"{t[2]}f={t[0]} angle={t[1]}" if t[3] else f"{t[2]}angle={t[1]};F={t[0]}")
junk = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=30)
line = st.one_of(record, record, junk, st.sampled_from(["", "  ", "f=1", "f=x angle=2", "angle=3 f==4"]))


@settings(deadline=None, derandomize=True, database=None, max_examples=25,
          suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line, max_size=40), ending=st.sampled_from(["\n", "\r\n"]), last_newline=st.booleans(),
       cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_any_partition_of_a_log_reads_each_record_once_and_counts_each_bad_line_once(
        tmp_path_factory, lines, ending, last_newline, cuts):
    path = tmp_path_factory.mktemp("fuzz") / "pmu.log"
    path.write_bytes((ending.join(lines) + (ending if last_newline else "")).encode())
    try:
        whole, skipped = records(path, KEY_VALUE, ["f", "angle"])
    except ReadError as exc:  # no key in the first lines, or nothing but blank lines: said in one line
        assert "\n" not in str(exc)
        return
    size = path.stat().st_size
    bounds = sorted({0, size, *(c % (size + 1) for c in cuts)})
    parts = [records(path, KEY_VALUE, ["f", "angle"], a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    for c in ("f", "angle"):
        np.testing.assert_array_equal(np.concatenate([whole[c][:0], *(p[0][c] for p in parts)]), whole[c])
    assert sum(p[1] for p in parts) == skipped
    non_blank = sum(1 for text in lines if text.strip())
    assert len(whole["f"]) + skipped == non_blank  # every line is a record or counted, none vanishes


def test_a_gzip_log_is_one_unit_read_as_a_stream(tmp_path):
    plain = demo.write_pmu_log(tmp_path / "grid_pmu.log.1", n_rows=300, bad_fraction=0.05, seed=4)
    packed = demo.write_pmu_log(tmp_path / "grid_pmu.log.2.gz", n_rows=300, bad_fraction=0.05, seed=4)
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and sniff_format(packed) == "log"
    options = EXTRACTORS["grid"](visible_capsules()["grid"]).read_options
    info = LOG.inspect(packed, options)
    assert (info.extent, info.n_rows, info.skipped_rows) == (1, 285, 15)
    expected, _ = records(plain, options, ["frequency", "phase_angle"])
    got, skipped = records(packed, options, ["frequency", "phase_angle"], 0, 1)
    np.testing.assert_array_equal(got["frequency"], expected["frequency"])
    assert skipped == 15
    assert len(records(packed, options, ["frequency"], 1, 2)[0]["frequency"]) == 0  # nothing past byte 0
    cut = tmp_path / "grid_cut.log.gz"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(ReadError, match="^corrupt gzip log: ") as caught:
        LOG.inspect(cut, options)
    assert "\n" not in str(caught.value)


def test_bad_files_named_like_logs_get_one_line_reasons(tmp_path):
    options = KEY_VALUE
    cases = {"binary.log": b"\x00\x01\x02\x03" * 10, "utf16.log": "f=1 angle=2\n".encode("utf-16"),
             "empty_gz.log.gz": gzip.compress(b""), "prose.txt": b"Lab notes.\nNothing here.\n",
             "one_long_line.log": b"f=1 " * 40_000}
    reasons = {}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ReadError) as caught:
            LOG.inspect(tmp_path / name, options)
        reasons[name] = str(caught.value)
    assert reasons == {
        "binary.log": "not a text log: binary content",
        "utf16.log": "UTF-16 text is not supported: save the file as UTF-8",
        "empty_gz.log.gz": "empty gzip log",
        "prose.txt": "no line parses with key=value tokens f=, angle= (2 lines; the first: 'Lab notes.')",
        "one_long_line.log": "not a text log: no line end in the first 65536 bytes",
    }


# --------------------------------------------------------------------------- the crawl


def test_the_crawl_assigns_logs_by_name_and_by_content_and_counts_bad_lines(tmp_path):
    data, conf = tmp_path / "data", tmp_path / "conf"
    demo.write_pmu_log(data / "grid_pmu_07.log", n_rows=200, bad_fraction=0.02)
    demo.write_pmu_log(data / "grid_pmu_07.log.1.gz", n_rows=100, bad_fraction=0.02, seed=1)
    demo.write_pmu_log(data / "station_12.log", n_rows=100, bad_fraction=0.05, seed=2)  # no name match
    demo.write_readme(data / "README.txt")
    (data / "grid_notes.log").write_text("frequency looked fine all day\n")  # a grid name, no record
    (data / "MHD_notes.txt").write_text("B=1 T\n")  # a fusion name: fusion reads HDF5 only
    demo.write_shot_capsule(conf)
    demo.write_shot_log(data / "shotlog_2024.log", n_shots=150, bad_fraction=0.02)
    rows = {e.path: e for e in crawl(crawl_cfg(data, tmp_path / "out", conf, "crawl.stats=false")).entries()}
    got = {p: (r.format, r.capsule, r.rule, r.n_samples, r.skipped_rows, r.error) for p, r in rows.items()}
    assert got == {
        "grid_pmu_07.log": ("log", "grid", "name:*grid*", 196, 4, None),
        "grid_pmu_07.log.1.gz": ("log", "grid", "name:*grid*", 98, 2, None),
        "station_12.log": ("log", "grid", "lines:key=value", 95, 5, None),
        "shotlog_2024.log": ("log", "shots", "name:*shotlog*", 147, 3, None),
        "README.txt": ("log", None, None, 0, None, "no capsule's log rule parses its lines"),
        "grid_notes.log": ("log", "grid", "name:*grid*", 0, None,
                           "no line parses with key=value tokens frequency=, phase_angle= "
                           "(1 line; the first: 'frequency looked fine all day')"),
        "MHD_notes.txt": ("log", "fusion", "name:*MHD*", 0, None, "format not supported: log (fusion reads hdf5)"),
    }
    assert rows["grid_pmu_07.log.1.gz"].extent == 1
    # the stream's counter agrees with the index, over byte ranges of any size
    capsule = visible_capsules()["grid"]
    extractor = EXTRACTORS["grid"](capsule)
    usable = [r for r in rows.values() if r.capsule == "grid" and r.error is None]
    state = entry_plan(extractor, usable[0]).state
    units = make_units(usable, extractor, state, unit_samples=64, unit_bytes=1000)
    assert sum(u.path == "grid_pmu_07.log.1.gz" for u in units) == 1 and len(units) > 20
    skipped, n = Counter(), 0
    for unit in units:
        n += sum(len(s) for s in read_unit(extractor, data, unit, 50, skipped=skipped))
    assert n == 196 + 98 + 95
    assert skipped == {"grid_pmu_07.log": 4, "grid_pmu_07.log.1.gz": 2, "station_12.log": 5}


def test_a_log_matching_two_capsules_by_content_is_ambiguous(tmp_path):
    data, conf = tmp_path / "data", tmp_path / "conf"
    write_capsule(conf, "pmu", """\
        name: pmu
        match: {name: ["*pmu_only*"]}
        variables: [frequency]
        """)
    demo.write_pmu_log(data / "station_3.log", n_rows=20)
    (row,) = crawl(crawl_cfg(data, tmp_path / "out", conf, "crawl.stats=false")).entries()
    assert row.error == "ambiguous: matches grid and pmu"


def test_capsule_files_that_are_not_data_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "code_ran"
    cases = {
        "tagged": f'name: tagged\nmatch: {{name: ["*x*"]}}\nvariables: !!python/object/apply:os.system ["touch {marker}"]\n',
        "custom": 'name: custom\nmatch: !include other.yaml\n',
        "broken": 'name: broken\nmatch: {name: ["*x*"]\n',
        "tabs": 'name: tabs\n\tvariables: [x]\n',
    }
    for name, text in cases.items():
        conf = tmp_path / name
        path = write_capsule(conf, name, text)
        with pytest.raises(CapsuleError) as caught:
            visible_capsules([conf])
        message = str(caught.value)
        assert message.startswith(f"{path}: not valid YAML at line ") and "\n" not in message
        if name in ("tagged", "custom"):
            assert "tags that construct objects are not allowed" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- end to end


def test_a_log_only_capsule_trains_and_exports_end_to_end(tmp_path):
    data, conf, out = tmp_path / "data", tmp_path / "conf", tmp_path / "out"
    demo.write_shot_capsule(conf)
    demo.write_shot_log(data / "shots" / "shotlog_a.log", n_shots=1500, seed=1)
    demo.write_shot_log(data / "shots" / "shotlog_b.log.1.gz", n_shots=1500, seed=2)
    manifest = crawl(crawl_cfg(data, out, conf, "crawl.workers=1"))
    assert {e.path: (e.n_samples, e.skipped_rows) for e in manifest.usable("shots")} == {
        "shots/shotlog_a.log": (1470, 30), "shots/shotlog_b.log.1.gz": (1470, 30)}
    # the statistics pass saw exactly the records, with the values the lines hold
    expected = []
    for name in ("shotlog_a.log", "shotlog_b.log.1.gz"):
        path = data / "shots" / name
        text = (gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()).decode()
        for line in text.splitlines():
            fields = dict(f.split("=", 1) for f in line.replace(" keV", "").split(" | ")[2:5] if "=" in f)
            try:
                expected.append([float(fields["Ip"].split()[0]), float(fields["ne"].split()[0]),
                                 float(fields["Te"])])
            except (KeyError, ValueError):
                continue
    expected = np.array(expected)
    stats = json.loads((out / "index" / "shots" / "stats.json").read_text())
    assert stats["count"] == len(expected) == 2940
    np.testing.assert_allclose(stats["mean"], expected.mean(axis=0), rtol=1e-5)
    cfg = compose("train", ["capsule=shots", f"data.root={data}", f"paths.root={out}", "debug=fast",
                            "trainer.max_steps=4", "data.batch_size=256", "trainer.enable_progress_bar=false",
                            "trainer.enable_model_summary=false"], extra_dirs=[conf])
    train(cfg)
    assert (out / "checkpoints" / "shots" / "last.ckpt").is_file()
    path = export(compose("export", ["capsule=shots", f"paths.root={out}", "export.resolution=9",
                                     "export.k=2", "export.progress=false", "export.plot=false",
                                     "export.axes=[ip,te]"], extra_dirs=[conf]))
    energy_map = EnergyMap.load(path)
    assert energy_map.metadata["capsule"] == "shots" and energy_map.energy_map.shape == (9, 9)
    assert energy_map.metadata["skipped_rows"] == 60  # the lines that did not parse, behind the map too
    counted = export(compose("export", ["capsule=shots", f"paths.root={out}", "export.method=histogram",
                                        "export.out=" + str(out / "hist.npz"), "export.progress=false",
                                        "export.plot=false", "export.axes=[ip,te]"], extra_dirs=[conf]))
    assert EnergyMap.load(counted).metadata["skipped_rows"] == 60
    centre = expected.mean(axis=0)[[0, 2]]
    assert np.isfinite(energy_map.energy(centre[None, :])).all()
