{{/*
etcd lock-down: generated TLS material, generated passwords, the access plan. Generated values are
made once per render and cached on .Values (a template included twice must not mint two CAs),
and taken from the live Secrets with `lookup` when they exist, so `helm upgrade` keeps them.
`helm template` has no cluster to look up: it mints new ones each time.
*/}}

{{/* True when some listener's certificate comes from this chart (not the user, not cert-manager). */}}
{{- define "ml-defender.etcd.tlsGenerated" -}}
{{- $tls := .Values.etcd.tls -}}
{{- if and .Values.etcd.enabled (not $tls.certManager.enabled) -}}
{{- if or (and $tls.client.enabled (not $tls.client.secretName)) (and $tls.peer.enabled (not $tls.peer.secretName)) }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* Every name a member is reached by: its stable pod name (wildcard), the Services, loopback. */}}
{{- define "ml-defender.etcd.dnsNames" -}}
{{- $full := include "ml-defender.etcd.fullname" . -}}
{{- $headless := include "ml-defender.etcd.headlessName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list (printf "*.%s.%s.svc.%s" $headless $ns .Values.clusterDomain) (printf "*.%s.%s.svc" $headless $ns) (printf "*.%s.%s" $headless $ns) -}}
{{- range $svc := list $full $headless -}}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain)) -}}
{{- end -}}
{{- toJson (append $names "localhost") -}}
{{- end -}}

{{/*
{"ca": PEM, "client": {crt, key}, "peer": {crt, key}} for the listeners whose certificate the
chart makes: the live Secrets' data when all of them exist with one CA (they are kept or
replaced together), else freshly generated.
*/}}
{{- define "ml-defender.etcd.generatedTls" -}}
{{- if not (hasKey .Values "_mlDefenderTls") -}}
{{- $ns := .Release.Namespace -}}
{{- /* The listeners whose certificate this chart makes, and what of them is live already. */ -}}
{{- $needed := list -}}
{{- $live := dict -}}
{{- range $listener := list "client" "peer" -}}
{{- $tls := index $.Values.etcd.tls $listener -}}
{{- if and $tls.enabled (not $tls.secretName) -}}
{{- $needed = append $needed $listener -}}
{{- $found := lookup "v1" "Secret" $ns (include (printf "ml-defender.etcd.%sServerSecret" $listener) $) -}}
{{- if and $found $found.data (index $found.data "tls.crt") -}}
{{- $_ := set $live $listener $found.data -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $cas := list -}}
{{- range $listener, $data := $live -}}
{{- $cas = append $cas (index $data "ca.crt") -}}
{{- end -}}
{{- $out := dict -}}
{{- if and (eq (len $live) (len $needed)) (eq (len (uniq $cas)) 1) -}}
{{- /* All live and signed by one CA: keep them. */ -}}
{{- $_ := set $out "ca" (first $cas | b64dec) -}}
{{- range $listener, $data := $live -}}
{{- $_ := set $out $listener (dict "crt" (index $data "tls.crt" | b64dec) "key" (index $data "tls.key" | b64dec)) -}}
{{- end -}}
{{- else -}}
{{- $days := int .Values.etcd.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "ml-defender.etcd.fullname" .)) $days -}}
{{- $names := include "ml-defender.etcd.dnsNames" . | fromJsonArray -}}
{{- $cn := include "ml-defender.etcd.fullname" . -}}
{{- $_ := set $out "ca" $ca.Cert -}}
{{- range $listener := $needed -}}
{{- $c := genSignedCert $cn (list "127.0.0.1") $names $days $ca -}}
{{- $_ := set $out $listener (dict "crt" $c.Cert "key" $c.Key) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_mlDefenderTls" $out -}}
{{- end -}}
{{- toJson (get .Values "_mlDefenderTls") -}}
{{- end -}}

{{/*
Pod-template annotation of the members and the operator: the checksum of the generated CA. etcd
and the library read the trusted CA only at start, so pods that kept running after the chart
re-issued the certificates (the Secrets deleted, then `helm upgrade`) would refuse the new ones;
the changed checksum rolls them. Lookup reuse keeps it put on every other upgrade. Generated
certificates only: cert-manager renews the members' certificates under the same CA (etcd reloads
those files itself), and the chart does not read your own Secrets. hack/render-manifests.sh
leaves it out of install.yaml (`helm template` mints a new CA at every render).
*/}}
{{- define "ml-defender.etcd.caChecksum" -}}
{{- if include "ml-defender.etcd.tlsGenerated" . -}}
checksum/etcd-ca: {{ (include "ml-defender.etcd.generatedTls" . | fromJson).ca | sha256sum }}
{{- end -}}
{{- end -}}

{{/* The PEM CA the clients trust, when the chart knows it (generated, or issued by cert-manager already). */}}
{{- define "ml-defender.etcd.caPem" -}}
{{- if include "ml-defender.etcd.tlsManaged" . -}}
{{- if not .Values.etcd.tls.certManager.enabled -}}
{{- (include "ml-defender.etcd.generatedTls" . | fromJson).ca -}}
{{- else -}}
{{- $issued := lookup "v1" "Secret" .Release.Namespace (include "ml-defender.etcd.clientServerSecret" .) -}}
{{- if and $issued $issued.data (index $issued.data "ca.crt") -}}
{{- index $issued.data "ca.crt" | b64dec -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- etcd authentication */}}

{{/* True when this release's etcd runs with authentication (external etcd: your own users). */}}
{{- define "ml-defender.etcd.authEnabled" -}}
{{- if and .Values.etcd.enabled .Values.etcd.auth.enabled }}true{{ end -}}
{{- end -}}

{{- define "ml-defender.etcd.authSecret" -}}
{{- printf "%s-auth" (include "ml-defender.etcd.fullname" .) -}}
{{- end -}}

{{/* Agents' components, each once, as a list of {name, namespace}. */}}
{{- define "ml-defender.agent.componentList" -}}
{{- $seen := dict -}}
{{- $out := list -}}
{{- range .Values.agent.components -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "agent.components lists %q twice: one etcd user per component" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- $out = append $out (dict "name" .name "namespace" (default $.Release.Namespace .namespace)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Passwords by Secret key (root, operator, health, agent-<component>): the live Secret's, else new. */}}
{{- define "ml-defender.etcd.passwords" -}}
{{- if not (hasKey .Values "_mlDefenderPasswords") -}}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "ml-defender.etcd.authSecret" .) -}}
{{- $have := dict -}}
{{- if and $live $live.data -}}
{{- $have = $live.data -}}
{{- end -}}
{{- $keys := list "root" "operator" "health" -}}
{{- range include "ml-defender.agent.componentList" . | fromJsonArray -}}
{{- $keys = append $keys (printf "agent-%s" .name) -}}
{{- end -}}
{{- $out := dict -}}
{{- range $keys -}}
{{- if hasKey $have . -}}
{{- $_ := set $out . (index $have . | b64dec) -}}
{{- else -}}
{{- $_ := set $out . (randAlphaNum 32) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_mlDefenderPasswords" $out -}}
{{- end -}}
{{- toJson (get .Values "_mlDefenderPasswords") -}}
{{- end -}}

{{/* The access plan the init container applies (defender_operator.etcd_access); no secret in it. */}}
{{- define "ml-defender.etcd.accessPlan" -}}
{{- $dir := "/etc/ml-defender/etcd-auth" -}}
{{- $agents := list -}}
{{- range include "ml-defender.agent.componentList" . | fromJsonArray -}}
{{- $agents = append $agents (dict "component" .name "user" (printf "%s%s" $.Values.etcd.auth.agentUserPrefix .name) "password_file" (printf "%s/agent-%s" $dir .name)) -}}
{{- end -}}
{{- toPrettyJson (dict "prefix" .Values.config.prefix "root_password_file" (printf "%s/root" $dir) "operator_user" .Values.etcd.auth.operatorUser "operator_password_file" (printf "%s/operator" $dir) "agents" $agents "health_user" .Values.etcd.auth.healthUser "health_password_file" (printf "%s/health" $dir)) -}}
{{- end -}}

{{/* Namespaces of the agents other than the release's, each once. */}}
{{- define "ml-defender.agent.namespaces" -}}
{{- $out := list -}}
{{- range include "ml-defender.agent.componentList" . | fromJsonArray -}}
{{- $out = append $out .namespace -}}
{{- end -}}
{{- toJson (uniq $out) -}}
{{- end -}}
