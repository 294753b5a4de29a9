"""makima settings, read from environment variables (see README, "Configuration")."""

from __future__ import annotations

import re
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from makima.env import database_from_url, env_bool, env_float, env_int, env_list, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", True)
_DEV_SECRET = "makima-development-only-secret-key-do-not-use-in-production"
SECRET_KEY = env_str("SECRET_KEY", _DEV_SECRET if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
if not DEBUG and SECRET_KEY == _DEV_SECRET:
    raise ImproperlyConfigured("SECRET_KEY must not be the development key when DEBUG is off")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_q",
    "directives",
    "contracts",
    "daemons",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "makima.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "makima.context_processors.navigation",
            ],
        },
    },
]

ASGI_APPLICATION = "makima.asgi.application"

DATABASES = {"default": database_from_url(env_str("DATABASE_URL", ""), base_dir=str(BASE_DIR))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env_str("MAKIMA_STATIC_ROOT", str(BASE_DIR / "staticfiles"))
STATICFILES_DIRS = [BASE_DIR / "static"]
# WhiteNoise serves static files from daphne itself: from the app folders while
# developing, from STATIC_ROOT (after `collectstatic`) in production.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# Channels: Redis when REDIS_URL is set, else the in-memory layer (one process).
REDIS_URL = env_url("REDIS_URL", "", schemes=("redis", "rediss", "unix"))
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py's default socket timeout (5 s) equals channels_redis's
            # BZPOPMIN wait (5 s): an idle receive would time out and drop the
            # socket (1011). A longer read timeout keeps idle sockets open.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}], "prefix": "makima"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Caches: the process's own memory, but API rate counts (makima.api.TokenRateThrottle)
# live in Redis when there is one, so that every web process counts against one limit.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "throttle": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "makima-throttle",
            "TIMEOUT": None,
        }
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "throttle"}
    ),
}

# django-q2: Redis broker when REDIS_URL is set, else the database (ORM) broker.
Q_CLUSTER = {
    "name": "makima",
    "workers": env_int("MAKIMA_Q_WORKERS", 2, minimum=1),
    "timeout": 120,
    "retry": 180,
    "catch_up": False,
    "label": "Background tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "daemons.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "makima.api.Pagination",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "makima.api.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "makima API",
    "DESCRIPTION": "Directives, chains, steps, evaluations, approvals, orders, contracts, tasks and daemons.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# makima's own settings.
MAKIMA_PUBLIC_URL = env_url("MAKIMA_PUBLIC_URL", "http://127.0.0.1:8000", schemes=("http", "https"))
MAKIMA_TICK_SECONDS = env_int("MAKIMA_TICK_SECONDS", 30, minimum=1)
MAKIMA_TASK_LEASE_S = env_int("MAKIMA_TASK_LEASE_S", 60, minimum=1)
MAKIMA_MAX_TASK_ATTEMPTS = env_int("MAKIMA_MAX_TASK_ATTEMPTS", 3, minimum=1)
MAKIMA_HEARTBEAT_INTERVAL_S = env_int("MAKIMA_HEARTBEAT_INTERVAL_S", 10, minimum=1)
MAKIMA_WS_MAX_BYTES = env_int("MAKIMA_WS_MAX_BYTES", 1024 * 1024, minimum=1024)
MAKIMA_WS_RATE_PER_S = env_float("MAKIMA_WS_RATE_PER_S", 50.0, minimum=0.1)
MAKIMA_WS_RATE_BURST = env_int("MAKIMA_WS_RATE_BURST", 200, minimum=1)
# The same for all the sockets one daemon token opened on one daphne process together.
MAKIMA_WS_TOKEN_RATE_PER_S = env_float("MAKIMA_WS_TOKEN_RATE_PER_S", 200.0, minimum=0.1)
MAKIMA_WS_TOKEN_RATE_BURST = env_int("MAKIMA_WS_TOKEN_RATE_BURST", 1000, minimum=1)
MAKIMA_OUTBOX_POLL_S = env_float("MAKIMA_OUTBOX_POLL_S", 1.0, minimum=0.05)
MAKIMA_MAX_REQUEST_BYTES = env_int("MAKIMA_MAX_REQUEST_BYTES", 5 * 1024 * 1024, minimum=1024)
MAKIMA_MAX_CONTRACT_FILE_BYTES = env_int("MAKIMA_MAX_CONTRACT_FILE_BYTES", 1024 * 1024, minimum=1)
MAKIMA_MAX_STEPS_PER_BATCH = env_int("MAKIMA_MAX_STEPS_PER_BATCH", 500, minimum=1)
MAKIMA_MAX_STEPS_PER_DIRECTIVE = env_int("MAKIMA_MAX_STEPS_PER_DIRECTIVE", 2000, minimum=1)
MAKIMA_TASK_OUTPUT_MAX_BYTES = env_int("MAKIMA_TASK_OUTPUT_MAX_BYTES", 64 * 1024, minimum=1)
# Output lines kept per task attempt; past it the oldest go, and a marker line in their place says how many.
MAKIMA_TASK_OUTPUT_MAX_LINES = env_int("MAKIMA_TASK_OUTPUT_MAX_LINES", 10_000, minimum=10)
# REST API requests per token ("N/s", "N/min", "N/hour", "N/day"; "0" = no limit): each user
# API key, and each task token (agents); past it: 429 with Retry-After. Sessions are not counted.
MAKIMA_API_RATE = env_str("MAKIMA_API_RATE", "1200/min")
MAKIMA_API_TASK_RATE = env_str("MAKIMA_API_TASK_RATE", "600/min")
for _rate in ("MAKIMA_API_RATE", "MAKIMA_API_TASK_RATE"):
    if not re.fullmatch(r"0|[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)", globals()[_rate]):
        raise ImproperlyConfigured(f'{_rate} must look like "600/min" (or "0" for no limit), not {globals()[_rate]!r}')
MAKIMA_COMPOSITE_AGENT_WEIGHT = env_float("MAKIMA_COMPOSITE_AGENT_WEIGHT", 0.5, minimum=0.0)
# Operability (makima/health.py, makima/metrics.py). /metrics wants this bearer
# token when it is set, and answers only loopback requests when it is not.
MAKIMA_METRICS_TOKEN = env_str("MAKIMA_METRICS_TOKEN", "")
MAKIMA_HEALTH_TIMEOUT_S = env_float("MAKIMA_HEALTH_TIMEOUT_S", 2.0, minimum=0.1)
MAKIMA_HEALTH_CLUSTER_STALE_S = env_int("MAKIMA_HEALTH_CLUSTER_STALE_S", 90, minimum=1)
# Load balancers probe /healthz over plain http: a redirect to https would fail the probe.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]

DATA_UPLOAD_MAX_MEMORY_SIZE = MAKIMA_MAX_REQUEST_BYTES

# Every line names the directive, step, task and daemon it is about, when
# known (`makima.logs.log_context`): " [directive=… step=… task=…]" before the message.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "makima.logs.ContextFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s%(log_context)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["context"]}},
    "root": {"handlers": ["console"], "level": env_str("MAKIMA_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

# Production hardening; `manage.py check --deploy` is clean with DEBUG off.
SESSION_COOKIE_SECURE = env_bool("MAKIMA_SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("MAKIMA_SSL_REDIRECT", not DEBUG)
SECURE_HSTS_SECONDS = env_int("MAKIMA_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if env_bool("MAKIMA_BEHIND_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
