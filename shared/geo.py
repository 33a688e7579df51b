"""Geography: AWS region coordinates, great-circle distance and the RTT it implies."""

from __future__ import annotations

import math
from typing import NamedTuple


class LatLon(NamedTuple):
    lat: float
    lon: float


#: Approximate coordinates of each AWS region's data-centre cluster (the metro it is named after).
AWS_REGIONS: dict[str, LatLon] = {
    "us-east-1": LatLon(38.95, -77.45),  # N. Virginia
    "us-east-2": LatLon(40.0, -83.0),  # Ohio
    "us-west-1": LatLon(37.35, -121.96),  # N. California
    "us-west-2": LatLon(45.84, -119.7),  # Oregon
    "ca-central-1": LatLon(45.5, -73.6),  # Montreal
    "ca-west-1": LatLon(51.05, -114.07),  # Calgary
    "mx-central-1": LatLon(20.59, -100.39),  # Querétaro
    "sa-east-1": LatLon(-23.55, -46.63),  # São Paulo
    "eu-west-1": LatLon(53.35, -6.26),  # Dublin
    "eu-west-2": LatLon(51.51, -0.13),  # London
    "eu-west-3": LatLon(48.86, 2.35),  # Paris
    "eu-central-1": LatLon(50.11, 8.68),  # Frankfurt
    "eu-central-2": LatLon(47.37, 8.54),  # Zurich
    "eu-north-1": LatLon(59.33, 18.07),  # Stockholm
    "eu-south-1": LatLon(45.46, 9.19),  # Milan
    "eu-south-2": LatLon(41.65, -0.88),  # Aragón
    "il-central-1": LatLon(32.08, 34.78),  # Tel Aviv
    "me-south-1": LatLon(26.07, 50.56),  # Bahrain
    "me-central-1": LatLon(25.2, 55.27),  # UAE
    "af-south-1": LatLon(-33.92, 18.42),  # Cape Town
    "ap-south-1": LatLon(19.08, 72.88),  # Mumbai
    "ap-south-2": LatLon(17.39, 78.49),  # Hyderabad
    "ap-east-1": LatLon(22.32, 114.17),  # Hong Kong
    "ap-southeast-1": LatLon(1.35, 103.82),  # Singapore
    "ap-southeast-2": LatLon(-33.87, 151.21),  # Sydney
    "ap-southeast-3": LatLon(-6.21, 106.85),  # Jakarta
    "ap-southeast-4": LatLon(-37.81, 144.96),  # Melbourne
    "ap-southeast-5": LatLon(3.14, 101.69),  # Kuala Lumpur
    "ap-northeast-1": LatLon(35.68, 139.69),  # Tokyo
    "ap-northeast-2": LatLon(37.57, 126.98),  # Seoul
    "ap-northeast-3": LatLon(34.69, 135.5),  # Osaka
    "ap-east-2": LatLon(25.03, 121.57),  # Taipei
    "ap-southeast-6": LatLon(-36.85, 174.76),  # Auckland
    "ap-southeast-7": LatLon(13.76, 100.5),  # Bangkok
    "us-gov-east-1": LatLon(40.0, -83.0),  # Ohio
    "us-gov-west-1": LatLon(45.6, -121.18),  # Oregon
    "cn-north-1": LatLon(39.9, 116.4),  # Beijing
    "cn-northwest-1": LatLon(38.49, 106.23),  # Ningxia
}

EARTH_RADIUS_KM = 6371.0088
#: Light in fibre covers ~200 km per ms; real paths are ~1.5x the great circle, and the trip is two-way.
_KM_PER_RTT_MS = 200.0 / (2 * 1.5)
#: Fixed cost of any path: last mile, switching, TLS/WebRTC framing.
_BASE_RTT_MS = 5.0


def region_location(region: str) -> LatLon | None:
    return AWS_REGIONS.get(region)


def must_be_known_region(region: str) -> str:
    """A region name whose coordinates we know, or a ValueError that says so (a validator's body)."""
    if region not in AWS_REGIONS:
        raise ValueError(f"region {region!r} has no known coordinates")
    return region


def haversine_km(a_lat: float, a_lon: float, b_lat: float, b_lon: float) -> float:
    """Great-circle distance in kilometres."""
    p1, p2 = math.radians(a_lat), math.radians(b_lat)
    dp, dl = p2 - p1, math.radians(b_lon - a_lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def rtt_estimate_ms(distance_km: float) -> float:
    """Round-trip time a network path of this great-circle length typically has."""
    return _BASE_RTT_MS + distance_km / _KM_PER_RTT_MS
