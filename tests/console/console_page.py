"""A console page in its own browser context, logged in with one key, that records what must never happen:
uncaught errors, Content-Security-Policy violations and dialogs (an injected `alert()` would open one)."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Page, expect


class ConsolePage:
    def __init__(self, browser: Browser, url: str, key: str, who: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        self.page.on("console", self._console)
        self.page.on("dialog", self._dialog)
        self.page.goto(url + "/ui/")
        self.page.fill("#key-input", key)
        self.page.click("#key-form button")
        expect(self.page.locator("#whoami")).to_have_text(who)

    def _console(self, msg) -> None:
        if "Content Security Policy" in msg.text or "Refused to" in msg.text:
            self.problems.append(f"csp: {msg.text}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, view: str) -> None:
        self.page.click(f'#tabs [data-view="{view}"]')
        expect(self.page.locator(f"#view-{view}")).to_be_visible()

    def shot(self, folder: Path, name: str) -> Path:
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def check_clean(self) -> None:
        """Nothing ran that should not have: no uncaught error, no CSP violation, no dialog, no injected img."""
        assert self.problems == [], self.problems
        assert self.dialogs == [], self.dialogs
        assert self.page.locator('img[src="x"]').count() == 0

    def close(self) -> None:
        self.context.close()
