"""Remote mode's settings: run on this computer or on a ``lesionlocator serve`` server, its URL,
the server model's name and the API key.

They are the user's, not the scene's: kept with Qt's ``QSettings`` (the per-user Slicer settings
file), the API key in the system keyring instead when the ``keyring`` package is installed and has
a usable backend (else in the settings file, which only the user should be able to read). Nothing
here is ever written to the parameter node, so a saved scene holds no key and no server.

The functions take the settings object (``value``/``setValue``/``remove``, as ``qt.QSettings``) and
the keyring (``get_password``/``set_password``/``delete_password``, or None) as arguments, so they
run without Qt.
"""
from __future__ import annotations

from dataclasses import dataclass

ENABLED, URL, MODEL, KEY = ("LesionLocator/Remote/Enabled", "LesionLocator/Remote/URL",
                            "LesionLocator/Remote/Model", "LesionLocator/Remote/APIKey")
KEYRING_SERVICE = "LesionLocator server API key"


@dataclass
class RemoteSettings:
    """``enabled``: run on the server; ``url``: http(s)://host:port; ``model``: a server model
    name ('' = the server's default); ``apiKey``: the client's key ('' = none)."""
    enabled: bool = False
    url: str = ""
    model: str = ""
    apiKey: str = ""

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteSettings(enabled={self.enabled}, url={self.url!r}, model={self.model!r})"


def systemKeyring():
    """The ``keyring`` module when it is installed and has a real backend, else None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None
    try:
        return None if isinstance(keyring.get_keyring(), fail.Keyring) else keyring
    except Exception:  # noqa: BLE001 - a broken backend (no D-Bus, locked store): use the settings file
        return None


def _text(value) -> str:
    return "" if value is None else str(value)


def load(settings, keyring=None) -> RemoteSettings:
    """The saved settings (defaults when none); the key from ``keyring`` (under the URL) when
    one is given and holds it, else from ``settings``."""
    url = _text(settings.value(URL, ""))
    key = ""
    if keyring is not None and url:
        try:
            key = _text(keyring.get_password(KEYRING_SERVICE, url))
        except Exception:  # noqa: BLE001 - keyring backends raise their own errors
            key = ""
    return RemoteSettings(_text(settings.value(ENABLED, "false")).lower() == "true", url,
                          _text(settings.value(MODEL, "")), key or _text(settings.value(KEY, "")))


def save(remote: RemoteSettings, settings, keyring=None) -> str:
    """Save ``remote``; the key goes to ``keyring`` when given (and is then removed from
    ``settings``), else to ``settings``. Returns where the key went: 'keyring', 'settings' or ''
    (no key)."""
    settings.setValue(ENABLED, "true" if remote.enabled else "false")
    settings.setValue(URL, remote.url)
    settings.setValue(MODEL, remote.model)
    if keyring is not None and remote.url:
        try:
            if remote.apiKey:
                keyring.set_password(KEYRING_SERVICE, remote.url, remote.apiKey)
            else:
                _forget(keyring, remote.url)
            settings.remove(KEY)
            return "keyring" if remote.apiKey else ""
        except Exception:  # noqa: BLE001 - fall back to the settings file
            pass
    if remote.apiKey:
        settings.setValue(KEY, remote.apiKey)
        return "settings"
    settings.remove(KEY)
    return ""


def _forget(keyring, url: str) -> None:
    try:
        keyring.delete_password(KEYRING_SERVICE, url)
    except Exception:  # noqa: BLE001 - nothing stored
        pass
