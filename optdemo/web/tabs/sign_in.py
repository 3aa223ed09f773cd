"""The Configuration tab's admin sign-in (public mode with ``--auth`` accounts only).

The password never enters a Gradio event. *Sign in* runs in the browser: its script posts the form
to ``/optdemo/sign-in`` (:mod:`optdemo.web.admin_routes`), which answers with the admin credential
as an HttpOnly, SameSite=Strict cookie, and empties the password box. Then a server handler,
:func:`refresh_admin`, reads the cookie from the request (it rides along with every call the page
makes) and unlocks the admin controls, or locks them again after *Sign out*; it also runs as the
page loads, so a reload keeps an admin signed in until the credential expires.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.web.admin_routes import SIGN_IN_PATH, SIGN_OUT_PATH, SIGNED_IN
from optdemo.web.api import admin_of
from optdemo.web.binding import Updates, bind
from optdemo.web.tabs.config_components import ConfigTab, SignIn
from optdemo.web.tabs.config_text import status_for

# The page's root URL, as Gradio's own components find it (an app served under a path included).
_ROOT = "((window.gradio_config && window.gradio_config.root) || '').replace(/\\/+$/, '')"
# (username, password) -> [password box, message]: the box is emptied whatever happens.
SIGN_IN_JS = f"""async (username, password) => {{
  try {{
    const answer = await fetch({_ROOT} + '{SIGN_IN_PATH}', {{
      method: 'POST',
      credentials: 'same-origin',
      headers: {{'Content-Type': 'application/json'}},
      body: JSON.stringify({{username: username || '', password: password || ''}}),
    }});
    return ['', (await answer.json()).message];
  }} catch (error) {{
    return ['', 'The sign-in request failed (' + error + '): check the connection and sign in again.'];
  }}
}}"""
# () -> message
SIGN_OUT_JS = f"""async () => {{
  try {{
    const answer = await fetch({_ROOT} + '{SIGN_OUT_PATH}', {{method: 'POST', credentials: 'same-origin'}});
    return (await answer.json()).message;
  }} catch (error) {{
    return 'The sign-out request failed (' + error + '): reload the page and sign out again.';
  }}
}}"""


def layout_sign_in() -> SignIn:
    """The sign-in form, in a closed accordion."""
    with gr.Accordion("Admin sign-in", open=False):
        user = gr.Textbox(label="Username")
        password = gr.Textbox(label="Password", type="password")
        with gr.Row():
            button = gr.Button("Sign in")
            sign_out = gr.Button("Sign out", variant="secondary")
        return SignIn(user, password, button, gr.Markdown(), sign_out)


def admin_controls(tab: ConfigTab) -> list[Any]:
    """What :func:`refresh_admin` updates: the controls only admins may use, and what depends on
    being one (the form's message, the model picker's choices, the status line)."""
    form = tab.sign_in
    assert form is not None, "the sign-in form exists only in public mode with --auth accounts"
    locked = [tab.load_btn, tab.unload_btn, tab.clear_cache_btn, tab.tokenizer]
    return [form.message, *locked, tab.model, tab.status]


def refresh_admin(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """Unlock loading, unloading, the cache button and the wider model list when the request
    carries a live admin credential (the cookie), else lock them. The form's message is left to
    the sign-in route's answer unless signed in."""
    form = tab.sign_in
    assert form is not None, "the sign-in form exists only in public mode with --auth accounts"
    admin = admin_of(request)
    signed_in = service.is_admin(admin)
    allowed = gr.update(interactive=signed_in)
    updates: Updates = {
        **dict.fromkeys((tab.load_btn, tab.unload_btn, tab.clear_cache_btn, tab.tokenizer), allowed),
        # A typed name is always taken: the plan says whether this caller may use it.
        tab.model: gr.update(allow_custom_value=True, choices=service.model_choices(admin)),
        tab.status: status_for(service, admin),
    }
    if signed_in:
        updates[form.message] = SIGNED_IN
    return updates


def wire_sign_in(service: DemoService, tab: ConfigTab) -> None:
    """Connect the form: each button's script talks to its route, then the controls follow."""
    form = tab.sign_in
    assert form is not None, "the sign-in form exists only in public mode with --auth accounts"
    browser_only = {"api_visibility": "private", "queue": False}
    refresh = bind(refresh_admin, service, tab)
    signed = gr.on(
        [form.button.click, form.password.submit],
        None,
        [form.user, form.password],
        [form.password, form.message],
        js=SIGN_IN_JS,
        **browser_only,
    )
    signed.then(refresh, {tab.loaded}, admin_controls(tab), **browser_only)
    left = form.sign_out.click(None, None, form.message, js=SIGN_OUT_JS, **browser_only)
    left.then(refresh, {tab.loaded}, admin_controls(tab), **browser_only)
