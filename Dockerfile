# One image for every region:
#   docker run -v /srv/purlgate-usa:/var/lib/purlgate -v /etc/purlgate/regions.toml:/etc/purlgate/regions.toml:ro \
#     -p 25:2525 -p 22:2222 -p 443:8443 IMAGE serve --region usa --config /etc/purlgate/regions.toml
# (set the listeners' host to 0.0.0.0 in that regions.toml, and tls_cert/tls_key; the
# web side may also serve plain HTTP behind a TLS proxy).
FROM python:3.11-slim-bookworm

# gnupg: PGP for clients who encrypt (python-gnupg drives the real gpg binary).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/purlgate --create-home purlgate

WORKDIR /opt/purlgate
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .

# Config and state live outside the image: mount regions.toml and a data volume.
# Relative data_dir paths in regions.toml resolve against the working directory.
USER purlgate
WORKDIR /var/lib/purlgate
VOLUME ["/var/lib/purlgate"]
EXPOSE 2525 2222 8443
ENTRYPOINT ["purlgate"]
CMD ["check-config"]
