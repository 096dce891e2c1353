"""Third-party plugins arrive through the `vetd` entry-point group, as on a real install."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.support.procs import REPO, run_vetd, vetd_env

EXAMPLE = REPO / "examples" / "vetd-example-plugin"

PLUGIN = '''
import msgspec
from vetd.agent.checks import Check, Outcome
from vetd.agent.api import hookimpl


class SiteConfig(msgspec.Struct, forbid_unknown_fields=True):
    motd: str = "hello"


@hookimpl
def vetd_config_tables():
    return {"site": SiteConfig}


@hookimpl
def vetd_register_checks(registry, configs):
    motd = configs.typed("site", SiteConfig).motd
    registry.add(Check("site_motd", lambda: Outcome(status="pass", message=motd), profiles=frozenset({"prolog"})))


def _hello(args):
    print(f"hello {args.who}")
    return 3


@hookimpl
def vetd_cli_commands(subparsers):
    hello = subparsers.add_parser("site-hello", help="a subcommand from a plugin")
    hello.add_argument("who")
    hello.set_defaults(func=_hello)
'''

BROKEN = '''
from vetd.agent.api import hookimpl


@hookimpl
def vetd_register_checks(registry, configs):
    raise RuntimeError("site plugin bug")
'''


def install(site: Path) -> None:
    """An installed distribution, as pip leaves it: module plus dist-info with entry points."""
    (site / "sitevetd.py").write_text(PLUGIN)
    (site / "brokenvetd.py").write_text(BROKEN)
    info = site / "sitevetd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sitevetd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vetd]\nsite = sitevetd\nbroken = brokenvetd\n")


def install_with_a_broken_one(site: Path) -> dict[str, str]:
    """:func:`install`, plus a distribution whose entry point names a module that is not there;
    returns the environment that sees them."""
    install(site)
    info = site / "gonevetd-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gonevetd\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[vetd]\ngone = gonevetd_missing_module\n")
    env = vetd_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    return env


def test_entry_point_plugins_load_configure_and_can_be_disabled(tmp_path: Path) -> None:
    install(tmp_path)
    env = vetd_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    config = tmp_path / "agent.toml"
    config.write_text('[plugins.site]\nmotd = "from config"\n')
    done = run_vetd("check", "--config", str(config), "--json", "--profile", "prolog", env=env)
    results = {(r["check"], r["entity"]): r for r in map(json.loads, done.stdout.splitlines())}
    assert results[("site_motd", "node")]["message"] == "from config"
    assert results[("site_motd", "node")]["plugin"] == "site"
    # a plugin whose registration raises is reported, and the others still run
    broken = results[("plugin_load", "broken")]
    assert broken["status"] == "error" and "site plugin bug" in broken["message"]
    assert ("host_memory", "node") in results
    assert done.returncode == 2  # a broken plugin is vetd's own failure, not the node's: no drain

    config.write_text('[agent]\ndisable_plugins = ["broken", "site"]\n[plugins.site]\nmotd = "x"\n')
    done = run_vetd("check", "--config", str(config), "--json", "--profile", "prolog", env=env)
    checks = {r["check"] for r in map(json.loads, done.stdout.splitlines())}
    assert "site_motd" not in checks and "plugin_load" not in checks and "host_memory" in checks
    assert done.returncode == 0, done.stdout

    config.write_text('[plugins.site]\nmotd = 5\n')
    done = run_vetd("check", "--config", str(config), env=env)
    assert done.returncode == 2
    assert f"{config}:2: plugins.site.motd: Expected `str`, got `int`" in done.stderr


def test_a_plugin_adds_a_subcommand_to_vetd(tmp_path: Path) -> None:
    env = install_with_a_broken_one(tmp_path)
    done = run_vetd("site-hello", "world", env=env)
    assert (done.returncode, done.stdout) == (3, "hello world\n"), done.stderr
    assert "site-hello" in run_vetd("--help", env=env).stdout
    # The agent's own plugin host accepts the same module (the hook has a spec there too).
    checked = run_vetd("check", "site_motd", "--json", env=env)
    results = {(r["check"], r["entity"]): r for r in map(json.loads, checked.stdout.splitlines())}
    assert results[("site_motd", "node")]["message"] == "hello", checked.stderr


def test_a_plugin_that_fails_to_import_is_named_and_the_others_still_run(tmp_path: Path) -> None:
    env = install_with_a_broken_one(tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ndisable_plugins = ["broken"]\n')
    done = run_vetd("check", "--config", str(config), "--json", "--profile", "prolog", env=env)
    results = {(r["check"], r["entity"]): r for r in map(json.loads, done.stdout.splitlines())}
    gone = results[("plugin_load", "gone")]
    assert gone["status"] == "error" and "cannot import gonevetd_missing_module" in gone["message"]
    assert ("site_motd", "node") in results and ("host_memory", "node") in results  # the rest loaded
    assert done.returncode == 2  # vetd's own failure: the prolog logs it, no drain
    # Its config table names it and why it is missing; vetd itself cannot run as configured: exit 2.
    config.write_text('[plugins.gone]\nlevel = 3\n')
    done = run_vetd("check", "--config", str(config), env=env)
    assert done.returncode == 2
    assert f"{config}:1: plugins.gone" in done.stderr and "plugin 'gone' failed to load" in done.stderr


def test_typos_in_plugin_and_check_names_are_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    cases = {
        '[agent]\ndisable_plugins = ["hostt"]\n': f"{config}:2: agent.disable_plugins: no plugin named 'hostt'",
        '[checks.host_lod]\ninterval = "5m"\n': f"{config}:1: checks.host_lod: no check named 'host_lod'",
    }
    for text, message in cases.items():
        config.write_text(text)
        done = run_vetd("check", "--config", str(config))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_vetd_plugins_lists_name_origin_checks_and_failures(tmp_path: Path) -> None:
    env = install_with_a_broken_one(tmp_path)
    done = run_vetd("plugins", "--json", env=env)
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["host"]["origin"].startswith("built-in") and "host_memory" in rows["host"]["checks"]
    assert rows["site"]["origin"] == "sitevetd 1.0" and rows["site"]["checks"] == ["site_motd"]
    assert rows["site"]["tables"] == ["plugins.site"]
    assert rows["gone"]["status"] == "broken" and "gonevetd_missing_module" in rows["gone"]["error"]
    table = run_vetd("plugins", env=env).stdout
    assert "sitevetd 1.0" in table and "broken" in table


def test_the_example_plugin_installs_and_runs_through_its_entry_point(tmp_path: Path) -> None:
    """The package docs/plugins.md points authors to, built and installed as a user would."""
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(site), str(EXAMPLE)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    env = vetd_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    rows = {row["name"]: row for row in json.loads(run_vetd("plugins", "--json", env=env).stdout)}
    assert rows["example"]["origin"] == "vetd-example-plugin 0.1.0" and rows["example"]["status"] == "ok"
    assert rows["example"]["checks"] == ["example_heartbeat"]
    heartbeat = tmp_path / "beat"
    config = tmp_path / "agent.toml"
    config.write_text(f'[plugins.example]\npath = "{heartbeat}"\n')
    missing = run_vetd("check", "example_heartbeat", "--config", str(config), "--json", env=env)
    assert missing.returncode == 1 and json.loads(missing.stdout)["codes"] == ["heartbeat_missing"]
    heartbeat.touch()
    fresh = run_vetd("check", "example_heartbeat", "--config", str(config), "--json", env=env)
    assert fresh.returncode == 0 and json.loads(fresh.stdout)["metrics"]["heartbeat_age_s"] < 60
    sample = run_vetd("config", "--sample", "agent", env=env).stdout
    assert "[plugins.example]" in sample and "# Older than this: warn; missing: fail." in sample
    config.write_text('[plugins.example]\ntimeout = -1\n')
    bad = run_vetd("check", "--config", str(config), env=env)
    assert bad.returncode == 2 and f"{config}:2: plugins.example.timeout: Expected `float` > 0.0" in bad.stderr


def test_plugins_import_only_the_public_api() -> None:
    """Built-ins are plugins like any other: vetd.agent.api is all they may use of the agent."""
    offenders = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "plugins").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bvetd\.agent\.(?!api\b)", line)]
    assert not offenders, offenders
