# One image for every region; the region comes from PURLGATE_REGION (or --region).
#   docker build -t purlgate .
#   docker run -e PURLGATE_REGION=usa \
#     -v purlgate-usa:/var/lib/purlgate -v "$PWD/deploy:/etc/purlgate:ro" \
#     -v /srv/purlgate/secrets:/run/secrets:ro -p 25:2525 -p 22:2222 -p 443:8443 purlgate
# compose.yaml runs usa and eur side by side with deploy/regions.toml.
FROM python:3.11-slim-bookworm

# gnupg: PGP for clients who encrypt (python-gnupg drives the real gpg binary).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg=2.2.* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/purlgate --create-home purlgate

WORKDIR /opt/purlgate
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# constraints.txt pins every dependency: the image runs what the suite tested.
RUN pip install --no-cache-dir -c constraints.txt .

ENV PURLGATE_REGION=usa \
    PURLGATE_CONFIG=/etc/purlgate/regions.toml \
    PYTHONUNBUFFERED=1

# State (spools, store, row data, renders, keys made once) in /var/lib/purlgate;
# configuration and templates read-only in /etc/purlgate; secrets in /run/secrets.
USER 10001
WORKDIR /var/lib/purlgate
VOLUME ["/var/lib/purlgate"]
EXPOSE 2525 2222 8443
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["purlgate", "healthcheck"]
ENTRYPOINT ["purlgate"]
CMD ["serve"]
