"""The application: the service the web layer calls (validation, access rules, sessions, the
backend choice), the settings from flags and environment, saved chats, and the OpenAI wire format.
It builds the model manager; it never imports gradio."""
