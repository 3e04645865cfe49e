"""The web dashboard's static assets (`static/`: index.html, app.js, style.css).

They are plain files packaged with the project and served by `peer.http.dashboard`: vanilla
JavaScript and CSS, no build step, no third-party code, nothing fetched from elsewhere, so the
dashboard works with no internet. The page reads the peer's API (docs/http-api.md) like any
client; docs/dashboard.md says what it shows and where each number comes from.
"""
