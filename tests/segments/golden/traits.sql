SELECT
  p.profile_id
FROM profiles AS p
WHERE
  COALESCE((
    (
      p.traits ->> '$.plan'
    ) = 'pro'
  ), FALSE)
  AND COALESCE((
    TRY_CAST(p.traits ->> '$.age' AS DOUBLE) BETWEEN 18 AND 30
  ), FALSE)
  AND (
    NOT (
      p.traits ->> '$.email'
    ) IS NULL
  )
