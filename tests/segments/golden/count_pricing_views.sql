WITH agg AS (
  SELECT
    ep.profile_id AS unit,
    COUNT(*) FILTER(WHERE
      e.timestamp > CAST('2026-01-25 12:00:00+00:00' AS TIMESTAMPTZ)
      AND COALESCE((
        COALESCE(e.event, e.name, e.type) = 'page_view'
      ), FALSE)
      AND COALESCE(CONTAINS(e.properties ->> '$.url', 'pricing'), FALSE)) AS c1
  FROM events AS e
  JOIN event_profiles AS ep
    ON ep.source = e.source AND ep.message_id = e.message_id
  WHERE
    (
      e.received_at <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND e.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
    )
    AND (
      e.timestamp > CAST('2026-01-25 12:00:00+00:00' AS TIMESTAMPTZ)
    )
  GROUP BY
    unit
)
SELECT
  p.profile_id
FROM profiles AS p
LEFT JOIN agg
  ON agg.unit = p.profile_id
WHERE
  COALESCE((
    COALESCE(agg.c1, 0) > 3
  ), FALSE)
