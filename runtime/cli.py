"""The `nadoo` command line. Every user-caused failure prints one line and exits with code 2."""

from __future__ import annotations

import functools
import json
import sys

import click

from .errors import NadooError


def _friendly(fn):
    """Turn nadoo's errors (and the usual OS/data errors) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NadooError as e:
            click.echo(f"nadoo: error: {e}", err=True)
            sys.exit(2)
        except (OSError, ValueError, MemoryError) as e:
            click.echo(f"nadoo: error: {type(e).__name__}: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("nadoo: interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nadoo")
def main():
    """nadoo: compile models into chunked .ndc bundles and run them reading only what an input needs."""


@main.command()
@click.argument("bundle", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the calibration activity heatmap to this PNG.")
@_friendly
def info(bundle, as_json, plot):
    """Show what is inside BUNDLE and how the model behaved during calibration."""
    from .info import bundle_facts, format_facts
    from .reader import Bundle

    with Bundle.open(bundle) as b:
        facts = bundle_facts(b)
    if plot:
        from .plot import plot_profile

        plot_profile(facts, plot)
    if as_json:
        click.echo(json.dumps(facts, indent=1, default=_jsonable))
    else:
        click.echo(format_facts(facts))
        if plot:
            click.echo(f"wrote {plot}")


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


if __name__ == "__main__":
    main()
