WITH agg AS (
  SELECT
    ep.profile_id AS unit,
    COUNT(*) AS c1
  FROM events AS e
  JOIN event_profiles AS ep
    ON ep.source = e.source AND ep.message_id = e.message_id
  WHERE
    (
      e.received_at <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND e.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND ep.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND ep.timestamp >= CAST('2026-01-25 12:00:00+00:00' AS TIMESTAMPTZ)
      AND (
        e.event IN ('page_view') OR e.event IS NULL
      )
    )
    AND (
      e.timestamp > CAST('2026-01-25 12:00:00+00:00' AS TIMESTAMPTZ)
      AND (
        COALESCE(e.event, e.name, e.type) = 'page_view'
        AND CONTAINS(e.properties ->> '$.url', 'pricing')
      )
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
  COALESCE(agg.c1, 0) > 3
