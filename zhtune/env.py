"""zhtune's on/off environment variables, read one way: `1/true/yes/on` and `0/false/no/off`, any case."""

import os

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """The variable's setting: unset or anything else keeps `default`; only the opposite word changes it."""
    value = os.environ.get(name, "").strip().lower()
    return value not in _OFF if default else value in _ON
