"""Dashboard views: server-rendered pages with small htmx partials."""
